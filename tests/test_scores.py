"""Task metrics against scikit-learn, the confidence interval and the normalised score."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics

from audiomaepp.evaluation import report
from audiomaepp.evaluation import scores


@pytest.mark.parametrize("seed", range(4))
def test_accuracy_matches_sklearn_on_random_predictions(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, 300)
  predictions = rng.random((300, 7)).astype(np.float32)
  expected = metrics.accuracy_score(labels, predictions.argmax(1))
  got = float(scores.top1_accuracy(predictions, np.eye(7, dtype=np.float32)[labels]))
  assert got == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("seed,quantize", [(0, False), (1, False), (2, True), (3, True)])
def test_map_matches_sklearn_on_random_predictions(seed, quantize):
  rng = np.random.default_rng(seed)
  targets = (rng.random((200, 9)) < 0.2).astype(np.float32)
  targets[:, 4] = 0  # a class without positives: AP 0, still in the mean (HEAR / sklearn)
  predictions = rng.random((200, 9)).astype(np.float32)
  if quantize:  # many tied scores: sklearn treats a tie group as one threshold
    predictions = np.round(predictions * 5) / 5
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # sklearn warns about the empty class
    expected = metrics.average_precision_score(targets, predictions, average="macro")
    per_class = metrics.average_precision_score(targets, predictions, average=None)
  assert per_class[4] == 0.0
  got = float(scores.mean_average_precision(predictions, targets))
  assert got == pytest.approx(expected, abs=1e-6)


def test_average_precision_of_a_perfect_ranking_is_one():
  got = scores.average_precision(np.array([0.9, 0.8, 0.1, 0.05]),
                                 np.array([True, True, False, False]))
  assert float(got) == pytest.approx(1.0)


def test_confidence_interval_is_the_student_t_half_width():
  values = [71.0, 73.5, 72.2, 70.9, 74.1, 72.8, 71.7, 73.0, 72.4, 71.9]
  mean, half = scores.confidence_interval(values)
  n = len(values)
  expected = scipy.stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
  assert mean == pytest.approx(np.mean(values))
  assert half == pytest.approx(expected, rel=1e-9)


def test_confidence_interval_edge_cases():
  assert scores.confidence_interval([5.0, 5.0, 5.0]) == (5.0, 0.0)
  mean, half = scores.confidence_interval([42.0])
  assert mean == 42.0 and math.isnan(half)
  with pytest.raises(ValueError, match="non-empty"):
    scores.confidence_interval([])


def test_normalized_score_on_a_hand_computed_example():
  table = {
      "a": {"t1": 50.0, "t2": 10.0, "t3": 80.0},
      "b": {"t1": 70.0, "t2": 30.0, "t3": 60.0},
      "c": {"t1": 90.0, "t2": 20.0, "t3": 70.0},
  }
  got = scores.normalized_scores(table, ["t1", "t2", "t3"])
  # t1: a 0, b 0.5, c 1; t2: a 0, b 1, c 0.5; t3: a 1, b 0, c 0.5.
  assert got["a"] == pytest.approx(100 * (0 + 0 + 1) / 3)
  assert got["b"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
  assert got["c"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
  # Only the listed tasks count.
  assert scores.normalized_scores(table, ["t1"]) == pytest.approx({"a": 0.0, "b": 50.0, "c": 100.0})


def test_normalized_score_is_undefined_for_a_single_model_and_needs_every_task():
  assert math.isnan(scores.normalized_scores({"a": {"t": 50.0}}, ["t"])["a"])
  with pytest.raises(ValueError, match="'b' has no score for tasks \\['t2'\\]"):
    scores.normalized_scores({"a": {"t1": 1.0, "t2": 2.0}, "b": {"t1": 3.0}}, ["t1", "t2"])


def test_paper_table_recomputes_close_to_the_published_scores():
  table = report.paper_table2()
  ids = [t["id"] for t in table["tasks"]]
  assert ids == ["BO", "Mri-S", "Mri-T", "NS-5h", "CD", "LC", "SC-5h", "VL", "E50", "F50K"]
  assert len(table["models"]) == 20
  large = next(m for m in table["models"] if m["name"] == "AudioMAE++-Large")
  assert large["scores"]["SC-5h"] == {"mean": 94.9, "ci": 0.2}
  assert large["overall"] == {"mean": 93.7, "ci": 0.2}
  means = {m["name"]: {t: m["scores"][t]["mean"] for t in ids} for m in table["models"]}
  recomputed = scores.normalized_scores(means, ids)
  # Within ~1.5 of the paper's column for the top models (its pool had more runs):
  # docs/reference.md#probe-protocol.
  for m in table["models"]:
    if m["overall"]["mean"] > 50:
      assert abs(recomputed[m["name"]] - m["overall"]["mean"]) <= 1.5, m["name"]
