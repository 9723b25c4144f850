"""hear-eval-kit's embedding folders: written as its embedding runner does, read back, its order.

For a scene task, `heareval.embeddings.runner` leaves in `<embeddings>/<module>/<task>/`:
`task_metadata.json`, `labelvocabulary.csv` and `<split>.json` (copies of the task's files); per
split `<split>.embeddings.npy`, raw float32 rows without an .npy header (an `np.memmap`) shaped
by `<split>.embedding-dimensions.json` (`[n, D]`), and `<split>.target-labels.pkl` (the pickled
list of label lists from `<split>.json`); and the marker `.done.embeddings`. The rows are stored in
the kit's order: each split's file names (the JSON's key order) shuffled by one
`random.Random(0)` that runs through the splits in metadata order. Its predictions runner trains
on that stored order and never reshuffles it (the training split is passed as a list, so the
loader's `split_name == "train"` shuffle never fires).
"""
import json
import os
import pathlib
import pickle
import random
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from audiomaepp.errors import UserError
from audiomaepp.evaluation import tasks as tasks_lib

DONE_FILE = ".done.embeddings"
ORDERS = ("shuffle", "sorted", "heareval")


def kit_file_order(task_dir: str | os.PathLike, splits: Sequence[str]) -> dict[str, list[str]]:
  """Per split, file names in the order hear-eval-kit stores their embeddings, from the
  `<split>.json` files of a task folder (or of an embedding folder holding their copies)."""
  task_dir = pathlib.Path(task_dir)
  prng = random.Random(0)
  orders = {}
  for split in splits:
    path = task_dir / f"{split}.json"
    if not path.is_file():
      raise UserError(f"{path}: missing; hear-eval-kit's order is made from each split's file "
                      "list (embed again with this version, which copies it)")
    files = list(_read_json(path))
    prng.shuffle(files)
    orders[split] = files
  return orders


def write_heareval_embeddings(out_dir: str | os.PathLike, task: tasks_lib.HearTask,
                              embeddings: Mapping[str, np.ndarray]) -> pathlib.Path:
  """Writes `out_dir/<task name>/` as hear-eval-kit's embedding runner does; returns it.

  Args:
    out_dir: the model's embedding folder (the kit's `<embeddings>/<module>`).
    task: the HEAR task folder that was embedded.
    embeddings: split -> (n, D) scene embeddings in `task.splits[split].files` order.
  """
  task_dir = pathlib.Path(out_dir) / task.name
  (task_dir / DONE_FILE).unlink(missing_ok=True)
  task_dir.mkdir(parents=True, exist_ok=True)
  orders = kit_file_order(task.task_dir, task.metadata["splits"])
  for split, files in orders.items():
    row = {name: i for i, name in enumerate(task.splits[split].files)}
    array = np.asarray(embeddings[split], np.float32)[[row[name] for name in files]]
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{task.name}/{split}: embeddings contain NaN or infinite values")
    labels = _read_json(task.task_dir / f"{split}.json")
    (task_dir / f"{split}.embedding-dimensions.json").write_text(json.dumps(array.shape))
    array.tofile(task_dir / f"{split}.embeddings.npy")
    with open(task_dir / f"{split}.target-labels.pkl", "wb") as f:
      pickle.dump([labels[name] for name in files], f)
    shutil.copy(task.task_dir / f"{split}.json", task_dir)
  for name in (tasks_lib.VOCABULARY_FILE, tasks_lib.METADATA_FILE):
    shutil.copy(task.task_dir / name, task_dir)
  (task_dir / DONE_FILE).touch()
  return task_dir


def has_heareval_embeddings(out_dir: str | os.PathLike, task_name: str) -> bool:
  """Whether `out_dir/task_name/` is complete (the kit's own test before embedding a task)."""
  return (pathlib.Path(out_dir) / task_name / DONE_FILE).is_file()


def is_heareval_folder(task_dir: str | os.PathLike) -> bool:
  """Whether an embedding folder has hear-eval-kit's layout (rather than this project's)."""
  return any(pathlib.Path(task_dir).glob("*.embedding-dimensions.json"))


def read_heareval_embeddings(task_dir: str | os.PathLike) -> tasks_lib.TaskEmbeddings:
  """Reads a scene task's folder written by hear-eval-kit (or `write_heareval_embeddings`) as
  the kit's predictions runner does: memmap + dimensions JSON + labels pickle. File names come
  from replaying the kit's order on the `<split>.json` copies."""
  task_dir = pathlib.Path(task_dir)
  metadata = tasks_lib.read_task_metadata(task_dir)
  if metadata["embedding_type"] != "scene":
    raise UserError(f"{task_dir / tasks_lib.METADATA_FILE}: embedding_type "
                    f"{metadata['embedding_type']!r}; only 'scene' tasks are evaluated")
  vocabulary = tasks_lib.read_vocabulary(task_dir)
  orders = kit_file_order(task_dir, metadata["splits"])
  splits = {}
  for split in metadata["splits"]:
    dims_path = task_dir / f"{split}.embedding-dimensions.json"
    dims = _read_json(dims_path)
    if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) for d in dims)):
      raise UserError(f"{dims_path}: expected [n, D], got {dims!r}")
    path = task_dir / f"{split}.embeddings.npy"
    expected = dims[0] * dims[1] * 4
    size = path.stat().st_size if path.is_file() else None
    if size != expected:
      raise UserError(f"{path}: expected {expected} bytes of float32 rows {tuple(dims)} (as "
                      f"{dims_path.name} says), found {'no file' if size is None else size}")
    embeddings = np.array(np.memmap(path, np.float32, "r", shape=tuple(dims)))
    labels = [[str(label) for label in row]
              for row in _read_labels(task_dir / f"{split}.target-labels.pkl")]
    if not len(labels) == dims[0] == len(orders[split]):
      raise UserError(f"{task_dir}/{split}: {dims[0]} embeddings, {len(labels)} label rows and "
                      f"{len(orders[split])} files in {split}.json; they must match")
    tasks_lib.check_finite(embeddings, path, split, orders[split])
    tasks_lib.check_labels(labels, vocabulary, metadata["prediction_type"],
                           f"{task_dir}/{split}.target-labels.pkl")
    splits[split] = tasks_lib.SplitEmbeddings(embeddings, labels, orders[split])
  return tasks_lib.TaskEmbeddings(task_dir.name, metadata, vocabulary, splits)


def read_embeddings(task_dir: str | os.PathLike) -> tasks_lib.TaskEmbeddings:
  """An embedding folder of either layout: hear-eval-kit's or this project's."""
  if is_heareval_folder(task_dir):
    return read_heareval_embeddings(task_dir)
  return tasks_lib.read_task_embeddings(task_dir)


def arrange(task: tasks_lib.TaskEmbeddings, task_dir: str | os.PathLike,
            order: str) -> tasks_lib.TaskEmbeddings:
  """The task with each split's rows in `order`: 'sorted' (file names) or 'heareval' (the kit's
  stored order, made from the `<split>.json` copies in `task_dir`); 'shuffle' keeps them."""
  if order not in ORDERS:
    raise ValueError(f"order {order!r}: expected one of {ORDERS}")
  if order == "shuffle":
    return task
  kit = kit_file_order(task_dir, list(task.splits)) if order == "heareval" else None
  splits = {}
  for name, split in task.splits.items():
    files = sorted(split.filenames) if kit is None else kit[name]
    row = {f: i for i, f in enumerate(split.filenames)}
    if sorted(row) != sorted(files):
      raise UserError(f"{task_dir}/{name}: the stored file names differ from {name}.json's")
    index = [row[f] for f in files]
    splits[name] = tasks_lib.SplitEmbeddings(
        split.embeddings[index], [split.labels[i] for i in index], files)
  return tasks_lib.TaskEmbeddings(task.name, task.metadata, task.vocabulary, splits)


class _LabelsUnpickler(pickle.Unpickler):
  """Plain containers and strings only: a labels pickle needs no classes, so none are loaded."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_labels(path: pathlib.Path) -> list:
  try:
    with open(path, "rb") as f:
      labels = _LabelsUnpickler(f).load()
  except FileNotFoundError:
    raise UserError(f"{path}: missing") from None
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise UserError(f"{path}: not a pickled list of label lists ({e})") from None
  if not isinstance(labels, list) or not all(isinstance(row, list) for row in labels):
    raise UserError(f"{path}: expected a list of label lists")
  return labels


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f"{path}: missing") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
