"""The vmapped HEAR probe: learning, chance level, per-member early stopping, fold aggregation."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from sklearn import preprocessing

from audiomaepp.evaluation import probe
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks

# A small probe for the mechanics tests (the protocol tests use the paper's defaults).
SMALL = probe.ProbeConfig(hidden_dim=32, learning_rate=1e-3, validate_every=1, patience=4,
                          max_epochs=60)


def _blobs(sizes, classes=4, dim=16, spread=1.0, seed=0):
  """Gaussian class clusters; returns [(x, one-hot y)] for each size, sharing the class means."""
  rng = np.random.default_rng(seed)
  means = 4.0 * rng.standard_normal((classes, dim))
  out = []
  for n in sizes:
    labels = rng.integers(0, classes, n)
    x = means[labels] + spread * rng.standard_normal((n, dim))
    out.append((x.astype(np.float32), np.eye(classes, dtype=np.float32)[labels]))
  return out


def _split_data(parts):
  return probe.SplitData(*[a for part in parts for a in part])


@pytest.mark.integration
def test_probe_learns_a_linearly_separable_task():
  data = _split_data(_blobs([120, 60, 200], spread=0.5))
  runs = probe.train_probes(data, metric="top1_acc", multilabel=False, seeds=range(3))
  assert runs.test_score.shape == (2, 3)
  assert runs.test_score.min() >= 0.98
  np.testing.assert_array_equal(runs.valid_score, 1.0)


@pytest.mark.integration
def test_probe_is_at_chance_on_shuffled_labels():
  rng = np.random.default_rng(1)
  parts = [(x, y[rng.permutation(len(y))]) for x, y in _blobs([120, 60, 200])]
  runs = probe.train_probes(_split_data(parts), metric="top1_acc", multilabel=False,
                            seeds=range(3))
  assert abs(runs.test_score.mean() - 0.25) < 0.07


@pytest.mark.integration
def test_probe_learns_a_separable_multilabel_task():
  rng = np.random.default_rng(2)
  parts = []
  for n in (150, 60, 120):
    x = rng.standard_normal((n, 12)).astype(np.float32)
    tags = (x[:, :5] > 0).astype(np.float32)  # tag k present iff feature k is positive
    x[:, :5] += np.where(tags > 0, 2.0, -2.0)  # with a margin
    parts.append((x, tags))
  config = dataclasses.replace(SMALL, max_epochs=300)
  runs = probe.train_probes(_split_data(parts), metric="mAP", multilabel=True, seeds=range(2),
                            config=config)
  assert runs.test_score.min() >= 0.95


def test_each_member_stops_on_its_own():
  data = _split_data(_blobs([90, 40, 60], spread=4.0, seed=3))
  together = probe.train_probes(data, metric="top1_acc", multilabel=False, seeds=[0, 1, 2],
                                config=SMALL)
  # Early stopping: the run ends `patience` checks after the best one, or at max_epochs.
  expected = np.minimum(together.best_epoch + SMALL.patience * SMALL.validate_every,
                        SMALL.max_checks * SMALL.validate_every)
  np.testing.assert_array_equal(together.epochs, expected)
  assert len(np.unique(together.epochs)) > 1, "members should stop at different epochs"
  # Seed 2 with other companions (same member count, so the same compiled program).
  others = probe.train_probes(data, metric="top1_acc", multilabel=False, seeds=[7, 2, 5],
                              config=SMALL)
  np.testing.assert_array_equal(others.epochs[:, 1], together.epochs[:, 2])
  np.testing.assert_array_equal(others.best_epoch[:, 1], together.best_epoch[:, 2])
  np.testing.assert_allclose(others.test_score[:, 1], together.test_score[:, 2], atol=1e-6)


def test_max_epochs_bounds_training():
  config = probe.ProbeConfig(hidden_dim=32, max_epochs=10, patience=10**6)
  data = _split_data(_blobs([50, 20, 20], seed=4))
  runs = probe.train_probes(data, metric="top1_acc", multilabel=False, seeds=[0], config=config)
  np.testing.assert_array_equal(runs.epochs, 9)  # checks at epochs 3, 6, 9
  assert set(runs.best_epoch.ravel()) <= {3, 6, 9}


def test_padding_rows_do_not_change_training_batch_norm():
  params, stats = probe.init_probe(0, n_in=6, n_classes=3, hidden_dim=16)
  x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
  padded = np.concatenate([x, 100 * np.ones((3, 6), np.float32)])
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  key = jax.random.key(0)
  train_logits = jax.jit(probe.train_logits)  # one compilation instead of op-by-op dispatch
  logits, new_stats = train_logits(params, stats, padded, mask, 0.0, key)
  ref_logits, ref_stats = train_logits(params, stats, x, np.ones(5, np.float32), 0.0, key)
  np.testing.assert_allclose(logits[:5], ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_stats["var"], ref_stats["var"], rtol=1e-5)
  # PyTorch BatchNorm1d: momentum 0.1 and the unbiased batch variance in the running estimate.
  h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  np.testing.assert_allclose(ref_stats["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref_stats["var"], 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)


def test_initialisation_is_xavier_normal_with_pytorch_biases():
  params, stats = probe.init_probe(3, n_in=960, n_classes=50)
  hidden, output = params["hidden"], params["output"]
  assert hidden["kernel"].shape == (960, 1024) and output["kernel"].shape == (1024, 50)
  assert hidden["kernel"].std() == pytest.approx(math.sqrt(2 / (960 + 1024)), rel=0.01)
  expected_output_std = math.sqrt(2) * math.sqrt(2 / (1024 + 50))
  assert output["kernel"].std() == pytest.approx(expected_output_std, rel=0.03)
  assert np.abs(hidden["bias"]).max() <= 1 / math.sqrt(960)
  assert np.abs(output["bias"]).max() <= 1 / math.sqrt(1024)
  np.testing.assert_array_equal(stats["var"], 1.0)
  again, _ = probe.init_probe(3, n_in=960, n_classes=50)
  np.testing.assert_array_equal(again["hidden"]["kernel"], hidden["kernel"])


def _fold_task(n_folds=3, per_fold=40):
  parts = _blobs([per_fold] * n_folds, classes=3, dim=8, spread=3.0, seed=5)
  vocabulary = ["a", "b", "c"]
  splits = {}
  for i, (x, y) in enumerate(parts):
    labels = [[vocabulary[k]] for k in y.argmax(1)]
    files = [f"{i}_{j}.wav" for j in range(per_fold)]
    splits[f"fold{i:02d}"] = tasks.SplitEmbeddings(x, labels, files)
  metadata = {"splits": sorted(splits), "split_mode": "new_split_kfold",
              "prediction_type": "multiclass", "embedding_type": "scene",
              "evaluation": ["top1_acc"]}
  return tasks.TaskEmbeddings("folds", metadata, vocabulary, splits)


def test_fold_task_uses_hear_rotation_and_first_run_grid_choice():
  task = _fold_task()
  result = probe.evaluate_task(task, seeds=[0, 1, 2], config=SMALL)
  assert [split["test"] for split, _ in result.runs] == [["fold00"], ["fold01"], ["fold02"]]
  assert [split["valid"] for split, _ in result.runs] == [["fold01"], ["fold02"], ["fold00"]]
  # Each run trained on the remaining fold: check one run against a direct call.
  split, runs = result.runs[1]
  direct = probe.train_probes(
      probe.SplitData(task.embeddings(["fold00"]), task.targets(["fold00"]),
                      task.embeddings(["fold02"]), task.targets(["fold02"]),
                      task.embeddings(["fold01"]), task.targets(["fold01"])),
      metric="top1_acc", multilabel=False, seeds=[0, 1, 2], config=SMALL)
  assert split["train"] == ["fold00"]
  np.testing.assert_allclose(direct.test_score, runs.test_score, atol=1e-6)
  # Seed score: grid point chosen on the first run's validation, test averaged over folds.
  choice = [int(np.argmax(result.runs[0][1].valid_score[:, s])) for s in range(3)]
  expected = [100 * np.mean([r.test_score[choice[s], s] for _, r in result.runs]) for s in range(3)]
  np.testing.assert_allclose(result.seed_scores, expected, rtol=1e-6)
  assert result.grid_choice == [SMALL.dropout_rates[c] for c in choice]
  assert (result.mean, result.ci) == pytest.approx(scores.confidence_interval(expected))
  summary = result.to_json()
  assert len(summary["runs"]) == 3 and len(summary["runs"][0]["test_scores"][0]) == 3


def test_standardize_matches_sklearn_standard_scaler():
  rng = np.random.default_rng(6)
  train = (1000 * rng.standard_normal((50, 7)) + 30).astype(np.float32)
  train[:, 3] = 2.5  # a constant feature
  test = rng.standard_normal((9, 7)).astype(np.float32)
  scaler = preprocessing.StandardScaler().fit(train.astype(np.float64))
  got_train, got_test = probe.standardize(train, test)
  np.testing.assert_allclose(got_train, scaler.transform(train), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_test, scaler.transform(test), rtol=1e-5, atol=1e-5)


def test_unsupported_metric_is_rejected():
  data = _split_data(_blobs([8, 4, 4]))
  with pytest.raises(ValueError, match="metric 'chroma_acc' is not supported"):
    probe.train_probes(data, metric="chroma_acc", multilabel=False, seeds=[0])
