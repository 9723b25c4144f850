"""Scores: the HEAR task metrics in JAX, confidence intervals and the aggregated normalised score.

The metrics follow hear-eval-kit (`heareval/score.py`): top-1 accuracy compares the arg-max of the
predictions with the arg-max of the one-hot targets; mAP is scikit-learn's
`average_precision_score(targets, predictions, average="macro")`, i.e. the mean over classes of
the step-wise (uninterpolated) average precision. A class without positives in the evaluated set
has AP 0 (scikit-learn >= 1.3 sets its recall to 1 at every threshold and warns) and still counts
in the mean, exactly as the HEAR numbers were computed.
"""
from collections.abc import Mapping, Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


@jax.jit
def top1_accuracy(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max prediction is the arg-max target; (n, classes) -> ()."""
  return jnp.mean(jnp.argmax(predictions, -1) == jnp.argmax(targets, -1))


@jax.jit
def average_precision(scores: jax.Array, positives: jax.Array) -> jax.Array:
  """Uninterpolated average precision of one class; (n,), (n,) -> ().

  Tied scores form one threshold (as in scikit-learn): every positive of a tie group is credited
  with the precision at the end of its group. A class without positives scores 0.
  """
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  sorted_scores = scores[order]
  hits = positives[order].astype(jnp.float32)
  precision = jnp.cumsum(hits) / jnp.arange(1, n + 1, dtype=jnp.float32)
  new_value = sorted_scores[1:] != sorted_scores[:-1]
  group = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), new_value.astype(jnp.int32)]))
  group_end = jnp.concatenate([new_value, jnp.ones((1,), bool)])
  # Precision is >= 0, so the maximum over a group of (precision at its end, zeros) picks it out.
  end_precision = jax.ops.segment_max(
      jnp.where(group_end, precision, 0.0), group, num_segments=n, indices_are_sorted=True)
  num_positives = hits.sum()
  ap = jnp.sum(hits * end_precision[group]) / jnp.maximum(num_positives, 1.0)
  return jnp.where(num_positives > 0, ap, 0.0)


@jax.jit
def mean_average_precision(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Macro mean over classes of the average precision; (n, classes) scores, multi-hot -> ()."""
  per_class = jax.vmap(average_precision, in_axes=(1, 1))(predictions, targets > 0.5)
  return per_class.mean()


# Metric names as they appear in a HEAR task's `evaluation` list (the first one is primary).
METRICS = {
    "top1_acc": top1_accuracy,
    "pitch_acc": top1_accuracy,
    "mAP": mean_average_precision,
}


def confidence_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """(mean, half-width of the Student-t interval) as scipy `t.interval(c, n-1, mean, sem)`.

  The half-width is NaN for fewer than two values and 0 when all values are equal.
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"expected a non-empty 1-D sequence of scores, got shape {values.shape}")
  mean = float(values.mean())
  if values.size < 2:
    return mean, math.nan
  sem = float(scipy.stats.sem(values))
  if sem == 0.0:
    return mean, 0.0
  low, high = scipy.stats.t.interval(confidence, values.size - 1, loc=mean, scale=sem)
  return mean, float(high - low) / 2


def normalized_scores(
    table: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> dict[str, float]:
  """Aggregated normalised score per model: 100 * mean_t (x_t(m) - min_t) / (max_t - min_t).

  `table` maps model -> task -> score; min and max are taken over all models of `table`, which must
  all have every task of `tasks`. A task on which all models tie has no defined normalisation and
  makes every score NaN (e.g. a single model without reference rows).
  """
  if not tasks:
    return {model: math.nan for model in table}
  for model, row in table.items():
    missing = [t for t in tasks if t not in row or row[t] is None]
    if missing:
      raise ValueError(f"model {model!r} has no score for tasks {missing}")
  values = np.array([[float(table[m][t]) for t in tasks] for m in table], np.float64)
  low, high = values.min(0), values.max(0)
  span = high - low
  with np.errstate(divide="ignore", invalid="ignore"):
    normalized = np.where(span > 0, (values - low) / span, np.nan)
  return {m: float(100.0 * normalized[i].mean()) for i, m in enumerate(table)}
