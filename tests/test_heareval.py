"""hear-eval-kit interoperation: its embedding layout both ways, its batch order, the baseline."""
import json
import pathlib
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from audiomaepp import audio
from audiomaepp.errors import UserError
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import tasks

VOCABULARY = ["dog", "cat", "bird"]


def _hear_task(root: pathlib.Path, sizes=(("train", 7), ("valid", 4), ("test", 5))):
  """A HEAR scene task folder (audio not needed); split JSON keys deliberately unsorted."""
  task_dir = root / "animals-v1.0-full"
  rng = np.random.default_rng(0)
  for split, n in sizes:
    names = [f"{split}_{i:02d}.wav" for i in rng.permutation(n)]
    (task_dir / "16000" / split).mkdir(parents=True)
    labels = {name: [VOCABULARY[int(rng.integers(3))]] for name in names}
    (task_dir / f"{split}.json").write_text(json.dumps(labels))
  metadata = {"task_name": "animals", "version": "v1.0", "embedding_type": "scene",
              "prediction_type": "multiclass", "split_mode": "trainvaltest",
              "sample_duration": 1.0, "evaluation": ["top1_acc"],
              "splits": [split for split, _ in sizes]}
  (task_dir / "task_metadata.json").write_text(json.dumps(metadata, indent=4))
  (task_dir / "labelvocabulary.csv").write_text(
      "idx,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(VOCABULARY)))
  return tasks.read_hear_task(task_dir)


def _embeddings(task):
  rng = np.random.default_rng(1)
  return {s: rng.standard_normal((len(split.files), 6)).astype(np.float32)
          for s, split in task.splits.items()}


def _kit_order(task_dir, splits):
  """The kit's task_embeddings: one random.Random(0), each split's file list shuffled in turn."""
  prng = random.Random()
  prng.seed(0)
  orders = {}
  for split in splits:
    split_data = json.load((task_dir / f"{split}.json").open())
    embedding_files = [pathlib.Path("out").joinpath(f"{f}.embedding.npy") for f in split_data]
    prng.shuffle(embedding_files)
    orders[split] = [f.name[:-len(".embedding.npy")] for f in embedding_files]
  return orders


def _read_as_the_kit(task_dir, split):
  """The kit's SplitMemmapDataset: dimensions JSON, float32 memmap, labels pickle."""
  dim = tuple(json.load(open(task_dir / f"{split}.embedding-dimensions.json")))
  embeddings = np.memmap(task_dir / f"{split}.embeddings.npy", dtype=np.float32, mode="r",
                         shape=dim)
  labels = pickle.load(open(task_dir / f"{split}.target-labels.pkl", "rb"))
  return np.array(embeddings), labels


def test_kit_layout_is_what_the_kit_writes_and_reads(tmp_path):
  task = _hear_task(tmp_path / "tasks")
  embeddings = _embeddings(task)
  out = heareval.write_heareval_embeddings(tmp_path / "emb", task, embeddings)
  splits = task.metadata["splits"]
  per_split = [".embeddings.npy", ".embedding-dimensions.json", ".target-labels.pkl", ".json"]
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [".done.embeddings", "labelvocabulary.csv", "task_metadata.json"]
      + [s + suffix for s in splits for suffix in per_split])
  for name in ["task_metadata.json", "labelvocabulary.csv"] + [f"{s}.json" for s in splits]:
    assert (out / name).read_bytes() == (task.task_dir / name).read_bytes()
  orders = _kit_order(task.task_dir, splits)
  for split in splits:
    stored, labels = _read_as_the_kit(out, split)
    assert (out / f"{split}.embeddings.npy").stat().st_size == stored.size * 4  # no header
    row = {f: i for i, f in enumerate(task.splits[split].files)}
    np.testing.assert_array_equal(stored, embeddings[split][[row[f] for f in orders[split]]])
    raw = json.loads((task.task_dir / f"{split}.json").read_text())
    assert labels == [raw[f] for f in orders[split]]
  assert orders["train"] != sorted(orders["train"])  # the permutation is not trivial


def test_both_layouts_read_back_alike_in_each_order(tmp_path):
  task = _hear_task(tmp_path / "tasks")
  embeddings = _embeddings(task)
  kit_dir = heareval.write_heareval_embeddings(tmp_path / "kit", task, embeddings)
  ours_dir = tasks.write_task_embeddings(
      tmp_path / "ours", task.name, task.metadata, task.vocabulary,
      {s: (embeddings[s], split.labels, split.files) for s, split in task.splits.items()},
      split_files={s: task.task_dir / f"{s}.json" for s in task.splits})
  assert heareval.is_heareval_folder(kit_dir) and not heareval.is_heareval_folder(ours_dir)
  orders = _kit_order(task.task_dir, task.metadata["splits"])
  for order in ("sorted", "heareval"):
    kit = heareval.arrange(heareval.read_embeddings(kit_dir), kit_dir, order)
    ours = heareval.arrange(heareval.read_embeddings(ours_dir), ours_dir, order)
    for split in task.splits:
      expected = sorted(orders[split]) if order == "sorted" else orders[split]
      assert kit.splits[split].filenames == ours.splits[split].filenames == expected
      np.testing.assert_array_equal(kit.splits[split].embeddings, ours.splits[split].embeddings)
      assert kit.splits[split].labels == ours.splits[split].labels
  # Embedding folders of an earlier version hold no <split>.json: the kit order is refused.
  for split in task.splits:
    (ours_dir / f"{split}.json").unlink()
  with pytest.raises(UserError, match="train.json: missing; hear-eval-kit's order"):
    heareval.arrange(tasks.read_task_embeddings(ours_dir), ours_dir, "heareval")


def test_bad_kit_folders_are_named(tmp_path):
  task = _hear_task(tmp_path / "tasks")
  out = heareval.write_heareval_embeddings(tmp_path / "emb", task, _embeddings(task))
  with open(out / "valid.target-labels.pkl", "wb") as f:
    pickle.dump([[VOCABULARY[0]]] * 3 + [[pathlib.Path("x")]], f)
  with pytest.raises(UserError, match=r"valid.target-labels.pkl: not a pickled list.*pathlib"):
    heareval.read_embeddings(out)
  with open(out / "valid.target-labels.pkl", "wb") as f:
    pickle.dump([[VOCABULARY[0]]] * 4, f)
  heareval.read_embeddings(out)
  path = out / "test.embeddings.npy"
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(UserError, match=r"test.embeddings.npy: expected 120 bytes of float32 rows "
                     r"\(5, 6\).*found 116"):
    heareval.read_embeddings(out)


def _run(*args):
  done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@pytest.mark.slow
def test_baseline_in_both_layouts_then_the_kit_order(hear_suite_dir, tmp_path):
  """`embed --baseline=logmel_stats --layout=both`: the kit's folder holds per-clip log-mel mean
  and std in the kit's order; `evaluate --order=heareval` scores it exactly as ours."""
  out = tmp_path / "emb"
  _run("audiomaepp.tools.embed", "--baseline=logmel_stats", f"--tasks_dir={hear_suite_dir}",
       "--tasks=kws", "--layout=both", f"--output_dir={out}")
  source = tasks.read_hear_task(hear_suite_dir / "kws-v1")
  kit_dir = out / "heareval" / "kws-v1"
  stored, labels = _read_as_the_kit(kit_dir, "test")
  first = _kit_order(source.task_dir, source.metadata["splits"])["test"][0]
  spec = audio.log_mel(audio.load_audio(source.task_dir / "16000" / "test" / first))
  np.testing.assert_allclose(stored[0], np.concatenate([spec.mean(0), spec.std(0)]), rtol=1e-6)
  assert stored.shape[1] == 160 and labels[0] == json.loads(
      (source.task_dir / "test.json").read_text())[first]

  scores = {}
  for name, folder in (("kit", out / "heareval"), ("ours", out)):
    _run("audiomaepp.tools.evaluate", f"--embeddings_dir={folder}", "--order=heareval",
         "--seeds=1", "--max_epochs=6", f"--output_dir={tmp_path / name}")
    scores[name] = json.loads((tmp_path / name / "scores.json").read_text())["tasks"]["kws-v1"]
  assert scores["kit"]["runs"] == scores["ours"]["runs"]
  assert scores["kit"]["protocol"]["order"] == "heareval"
