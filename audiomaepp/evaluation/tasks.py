"""HEAR 2021 task folders (the embed tool's input) and task embedding folders (its output).

A HEAR task folder holds `task_metadata.json` (`splits`, `split_mode`, `embedding_type`,
`prediction_type`, `evaluation`), `labelvocabulary.csv` (`idx,label`), one `<split>.json` per split
mapping file name -> list of labels, and the audio under `16000/<split>/`.

An embedding folder `OUT/<task_name>/` (layout in docs/evaluation.md) holds a copy of
`task_metadata.json`, `labelvocabulary.csv` and, per split, `<split>.embeddings.npy` (n, D) float32,
`<split>.labels.json` (list of label lists, file order) and `<split>.filenames.json`, and copies of
the task's `<split>.json` (they fix hear-eval-kit's order; see `heareval`).
`task_metadata.json` is written last, so its presence marks a complete folder.
"""
import csv
import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from audiomaepp.audio import io as audio_io
from audiomaepp.errors import UserError

SAMPLE_RATE = audio_io.SAMPLE_RATE
PREDICTION_TYPES = ("multiclass", "multilabel")
METADATA_FILE = "task_metadata.json"
VOCABULARY_FILE = "labelvocabulary.csv"
_DEFAULT_METRIC = {"multiclass": "top1_acc", "multilabel": "mAP"}


@dataclasses.dataclass(frozen=True)
class HearSplit:
  """One split of a HEAR task: file names (sorted), their audio paths and label lists."""
  files: list[str]
  paths: list[pathlib.Path]
  labels: list[list[str]]


@dataclasses.dataclass(frozen=True)
class HearTask:
  """A HEAR task folder: metadata, label vocabulary (index order) and its splits."""
  task_dir: pathlib.Path
  metadata: dict[str, Any]
  vocabulary: list[str]
  splits: dict[str, HearSplit]

  @property
  def name(self) -> str:
    """The folder name, e.g. 'esc50-v2.0.0-full'."""
    return self.task_dir.name


@dataclasses.dataclass(frozen=True)
class SplitEmbeddings:
  """Scene embeddings of one split: (n, D) float32, labels and file names in the same order."""
  embeddings: np.ndarray
  labels: list[list[str]]
  filenames: list[str]


@dataclasses.dataclass(frozen=True)
class TaskEmbeddings:
  """An embedding folder read back: metadata, vocabulary and every split's embeddings."""
  name: str
  metadata: dict[str, Any]
  vocabulary: list[str]
  splits: dict[str, SplitEmbeddings]

  @property
  def multilabel(self) -> bool:
    return self.metadata["prediction_type"] == "multilabel"

  def targets(self, split_names: Sequence[str]) -> np.ndarray:
    """Multi-hot targets (n, classes) float32 of the concatenated splits."""
    return multi_hot([row for s in split_names for row in self.splits[s].labels], self.vocabulary)

  def embeddings(self, split_names: Sequence[str]) -> np.ndarray:
    """Embeddings (n, D) of the concatenated splits."""
    return np.concatenate([self.splits[s].embeddings for s in split_names])


def multi_hot(labels: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
  """Multi-hot targets (n, classes) float32 of label lists, classes in vocabulary order."""
  index = {label: i for i, label in enumerate(vocabulary)}
  targets = np.zeros((len(labels), len(vocabulary)), np.float32)
  for i, row in enumerate(labels):
    targets[i, [index[label] for label in row]] = 1.0
  return targets


def read_task_metadata(task_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks `task_metadata.json` of a HEAR task or embedding folder."""
  path = pathlib.Path(task_dir) / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; a HEAR task folder needs {METADATA_FILE}")
  metadata = _read_json(path)
  if not isinstance(metadata, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
  splits = metadata.get("splits")
  if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
    raise UserError(
        f"{path}: field 'splits' must be a non-empty list of split names, got {splits!r}")
  if metadata.get("prediction_type") not in PREDICTION_TYPES:
    raise UserError(f"{path}: field 'prediction_type' must be one of {PREDICTION_TYPES}, "
                     f"got {metadata.get('prediction_type')!r}")
  if "embedding_type" not in metadata:
    raise UserError(f"{path}: field 'embedding_type' is missing ('scene' or 'event')")
  return metadata


def read_vocabulary(task_dir: str | os.PathLike) -> list[str]:
  """Labels of `labelvocabulary.csv` (columns idx,label; idx 0..n-1) in index order."""
  path = pathlib.Path(task_dir) / VOCABULARY_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; expected a CSV with columns idx,label")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or "idx" not in rows[0] or "label" not in rows[0]:
    raise UserError(f"{path}: expected a header 'idx,label' and at least one row")
  try:
    by_index = {int(r["idx"]): str(r["label"]) for r in rows}
  except ValueError as e:
    raise UserError(f"{path}: column idx must hold integers ({e})") from None
  if sorted(by_index) != list(range(len(rows))):
    raise UserError(f"{path}: idx must be 0..{len(rows) - 1} without gaps or repeats")
  vocabulary = [by_index[i] for i in range(len(rows))]
  if len(set(vocabulary)) != len(vocabulary):
    raise UserError(f"{path}: labels must be unique")
  return vocabulary


def read_hear_task(task_dir: str | os.PathLike) -> HearTask:
  """Reads a HEAR 2021 scene task folder: metadata, vocabulary, files, paths and labels per split.

  Only `embedding_type` 'scene' is accepted (event tasks need timestamp embeddings).
  """
  task_dir = pathlib.Path(task_dir)
  metadata = read_task_metadata(task_dir)
  if metadata["embedding_type"] != "scene":
    raise UserError(f"{task_dir / METADATA_FILE}: embedding_type {metadata['embedding_type']!r} "
                     "is not supported; only 'scene' tasks are evaluated")
  vocabulary = read_vocabulary(task_dir)
  splits = {}
  for split in metadata["splits"]:
    path = task_dir / f"{split}.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing; split {split!r} is listed in {METADATA_FILE}")
    mapping = _read_json(path)
    if not isinstance(mapping, dict):
      raise UserError(f"{path}: expected an object mapping file name -> list of labels")
    names = sorted(mapping)
    labels = []
    for name in names:
      row = mapping[name]
      if not isinstance(row, list):
        raise UserError(f"{path}: labels of {name!r} must be a list, got {row!r}")
      labels.append([str(label) for label in row])
    check_labels(labels, vocabulary, metadata["prediction_type"], str(path))
    audio_dir = task_dir / str(SAMPLE_RATE) / split
    if not audio_dir.is_dir():
      raise FileNotFoundError(
          f"{audio_dir}: missing; expected the {SAMPLE_RATE} Hz audio of {split!r}")
    splits[split] = HearSplit(names, [audio_dir / name for name in names], labels)
  return HearTask(task_dir, metadata, vocabulary, splits)


def data_splits(metadata: Mapping[str, Any]) -> list[dict[str, list[str]]]:
  """The (train, valid, test) split names of each evaluation run, as hear-eval-kit forms them.

  Fold-based tasks (`split_mode` naming folds, or all splits named fold*): for k sorted folds,
  run i tests on fold i, validates on fold i+1 (mod k) and trains on the rest. Otherwise one run
  on the 'train', 'valid' and 'test' splits.
  """
  splits = list(metadata["splits"])
  mode = metadata.get("split_mode")
  folds = ("fold" in mode) if isinstance(mode, str) else all(s.startswith("fold") for s in splits)
  if folds:
    folds = sorted(splits)
    if len(folds) < 3 or len(set(folds)) != len(folds):
      raise UserError(f"fold-based task needs at least 3 distinct folds, got {splits}")
    k = len(folds)
    return [{"train": [f for j, f in enumerate(folds) if j not in (i, (i + 1) % k)],
             "valid": [folds[(i + 1) % k]],
             "test": [folds[i]]} for i in range(k)]
  missing = {"train", "valid", "test"} - set(splits)
  if missing:
    raise UserError(
        f"split_mode {mode!r} needs splits train, valid and test; missing {sorted(missing)}")
  return [{"train": ["train"], "valid": ["valid"], "test": ["test"]}]


def primary_metric(metadata: Mapping[str, Any]) -> str:
  """The task's first `evaluation` metric, or the default for its prediction type."""
  evaluation = metadata.get("evaluation")
  if evaluation:
    return str(evaluation[0])
  return _DEFAULT_METRIC[metadata["prediction_type"]]


def write_task_embeddings(
    out_dir: str | os.PathLike,
    task_name: str,
    metadata: Mapping[str, Any],
    label_vocabulary: Sequence[str],
    splits: Mapping[str, tuple[np.ndarray, Sequence[Sequence[str]], Sequence[str]]],
    split_files: Mapping[str, str | os.PathLike] | None = None,
) -> pathlib.Path:
  """Writes `out_dir/task_name/` for the evaluator and returns its path.

  Args:
    out_dir: the embeddings directory (one sub-folder per task).
    task_name: folder name, normally the HEAR task folder's name.
    metadata: the HEAR task's metadata, copied verbatim.
    label_vocabulary: labels in index order.
    splits: split -> (embeddings (n, D), labels (n lists of label strings), file names (n)); every
      split named in `metadata['splits']` must be present.
    split_files: split -> the HEAR task's `<split>.json`, copied (as hear-eval-kit does) so that
      the kit's training order can be reproduced (`heareval.arrange`).
  """
  task_dir = pathlib.Path(out_dir) / task_name
  missing = [s for s in metadata["splits"] if s not in splits]
  if missing:
    raise UserError(f"{task_name}: no embeddings for splits {missing} listed in the metadata")
  vocabulary = [str(label) for label in label_vocabulary]
  dims = set()
  checked = {}
  for split, (embeddings, labels, filenames) in splits.items():
    embeddings = np.asarray(embeddings, np.float32)
    labels = [[str(label) for label in row] for row in labels]
    filenames = [str(name) for name in filenames]
    if embeddings.ndim != 2 or not len(embeddings) == len(labels) == len(filenames):
      raise UserError(
          f"{task_name}/{split}: expected embeddings (n, D) with n labels and n file names, "
          f"got {embeddings.shape}, {len(labels)} labels, {len(filenames)} names")
    if not np.all(np.isfinite(embeddings)):
      raise UserError(f"{task_name}/{split}: embeddings contain NaN or infinite values")
    check_labels(labels, vocabulary, metadata["prediction_type"], f"{task_name}/{split}")
    dims.add(embeddings.shape[1])
    checked[split] = (embeddings, labels, filenames)
  if len(dims) > 1:
    raise UserError(f"{task_name}: embedding sizes differ between splits: {sorted(dims)}")
  task_dir.mkdir(parents=True, exist_ok=True)
  # Removing the marker first keeps an interrupted rewrite from looking complete.
  (task_dir / METADATA_FILE).unlink(missing_ok=True)
  for split, (embeddings, labels, filenames) in checked.items():
    np.save(task_dir / f"{split}.embeddings.npy", embeddings)
    _write_json(task_dir / f"{split}.labels.json", labels)
    _write_json(task_dir / f"{split}.filenames.json", filenames)
  for split, path in (split_files or {}).items():
    shutil.copy(path, task_dir / f"{split}.json")
  with open(task_dir / VOCABULARY_FILE, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["idx", "label"])
    writer.writerows(enumerate(vocabulary))
  _write_json(task_dir / METADATA_FILE, dict(metadata))
  return task_dir


def has_task_embeddings(out_dir: str | os.PathLike, task_name: str) -> bool:
  """Whether `out_dir/task_name/` was completely written (resuming the embed tool)."""
  return (pathlib.Path(out_dir) / task_name / METADATA_FILE).is_file()


def list_task_dirs(embeddings_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Complete task folders of an embeddings directory, sorted by name."""
  root = pathlib.Path(embeddings_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: embeddings directory not found")
  return sorted(d for d in root.iterdir() if (d / METADATA_FILE).is_file())


def read_task_embeddings(task_dir: str | os.PathLike) -> TaskEmbeddings:
  """Reads an embedding folder written by `write_task_embeddings`."""
  task_dir = pathlib.Path(task_dir)
  metadata = read_task_metadata(task_dir)
  vocabulary = read_vocabulary(task_dir)
  splits = {}
  for split in metadata["splits"]:
    path = task_dir / f"{split}.embeddings.npy"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing; split {split!r} is listed in {METADATA_FILE}")
    embeddings = np.load(path)
    labels = _read_json(task_dir / f"{split}.labels.json")
    filenames = _read_json(task_dir / f"{split}.filenames.json")
    if embeddings.ndim != 2 or embeddings.dtype != np.float32:
      raise UserError(
          f"{path}: expected a (n, D) float32 array, got {embeddings.dtype} {embeddings.shape}")
    if not len(embeddings) == len(labels) == len(filenames):
      raise UserError(
          f"{task_dir}/{split}: {len(embeddings)} embeddings, {len(labels)} label rows and "
          f"{len(filenames)} file names; they must match")
    check_finite(embeddings, path, split, filenames)
    check_labels(labels, vocabulary, metadata["prediction_type"],
                  f"{task_dir}/{split}.labels.json")
    splits[split] = SplitEmbeddings(embeddings, labels, filenames)
  dims = {s.embeddings.shape[1] for s in splits.values()}
  if len(dims) > 1:
    raise UserError(f"{task_dir}: embedding sizes differ between splits: {sorted(dims)}")
  return TaskEmbeddings(task_dir.name, metadata, vocabulary, splits)


def check_finite(embeddings: np.ndarray, path: Any, split: str,
                 filenames: Sequence[str]) -> None:
  """Refuses embeddings with NaN or infinite values, naming the file, split and first bad row."""
  non_finite = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
  if non_finite.size:
    row = int(non_finite[0])
    raise UserError(
        f"{path}: split {split!r} row {row} ({filenames[row]}) holds NaN or infinite values "
        f"({non_finite.size} such rows); a probe trained on them scores at chance: embed the "
        "task again")


def check_labels(labels: Sequence[Sequence[str]], vocabulary: Sequence[str],
                 prediction_type: str, where: str) -> None:
  """Raises if a row names a label outside the vocabulary, or a multiclass row has not one."""
  known = set(vocabulary)
  for i, row in enumerate(labels):
    unknown = [label for label in row if label not in known]
    if unknown:
      raise UserError(f"{where}: row {i} has labels {unknown} that are not in the vocabulary")
    if prediction_type == "multiclass" and len(row) != 1:
      raise UserError(
          f"{where}: row {i} has {len(row)} labels; a multiclass task needs exactly one")


def _read_json(path: pathlib.Path) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: missing") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None


def _write_json(path: pathlib.Path, value: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f)
  os.replace(tmp, path)
