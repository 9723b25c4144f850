"""benchmarks/probe_agreement.py: the subsets it draws and the probes it compares."""
import numpy as np
import pytest

import conftest
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.train import probes


@pytest.fixture(scope="module")
def agreement():
  with conftest.benchmark_module("study"), conftest.benchmark_module("probe_agreement") as module:
    yield module


def test_a_draw_is_class_balanced_per_split_in_the_splits_proportion(agreement):
  labels = {"train": [[c] for c in "abc" * 20], "valid": [[c] for c in "abc" * 5],
            "test": [[c] for c in "abc" * 5]}
  keep = agreement.draw(labels, 18, np.random.default_rng(0))
  assert {s: len(k) for s, k in keep.items()} == {"train": 12, "valid": 3, "test": 3}
  for split, rows in keep.items():
    counts = np.unique([labels[split][i][0] for i in rows], return_counts=True)[1]
    assert counts.max() - counts.min() == 0 and len(set(rows)) == len(rows)
  again = agreement.draw(labels, 18, np.random.default_rng(0))
  other = agreement.draw(labels, 18, np.random.default_rng(1))
  assert all((again[s] == keep[s]).all() for s in keep)
  assert any(set(other[s]) != set(keep[s]) for s in keep)


def test_the_three_probes_score_a_separable_task_fully_and_the_first_is_the_probes(
    agreement, tmp_path):
  rng = np.random.default_rng(0)
  metadata = {"task_name": "toy", "prediction_type": "multiclass",
              "splits": ["train", "valid", "test"], "split_mode": "trainvaltest",
              "evaluation": ["top1_acc"], "embedding_type": "scene"}
  splits = {}
  for split, n in (("train", 30), ("valid", 12), ("test", 12)):
    y = np.arange(n) % 3
    x = (rng.normal(size=(n, 6)) + 4.0 * np.eye(6)[y]).astype(np.float32)
    splits[split] = (x, [[str(c)] for c in y], [f"{split}{i}.wav" for i in range(n)])
  task = tasks_lib.read_task_embeddings(
      tasks_lib.write_task_embeddings(tmp_path, "toy", metadata, ["0", "1", "2"], splits))
  keep = {s: np.arange(len(task.splits[s].labels)) for s in ("train", "valid", "test")}
  assert agreement.scores(task, keep) == [100.0, 100.0, 100.0]
  noise = {s: (rng.normal(size=v[0].shape).astype(np.float32), *v[1:]) for s, v in splits.items()}
  task = tasks_lib.read_task_embeddings(
      tasks_lib.write_task_embeddings(tmp_path / "n", "toy", metadata, ["0", "1", "2"], noise))
  x = np.concatenate([task.splits[s].embeddings for s in keep])
  y = np.concatenate([task.targets([s]).argmax(1) for s in keep])
  folds = np.repeat([0, 1, 2], [30, 12, 12])
  assert agreement.scores(task, keep)[0] == probes.probe_score(x, y, folds) < 70.0
