"""The HEAR downstream probe: every seed and grid point of a task in one JAX program.

Probe: Linear(n_in -> 1024) -> BatchNorm -> Dropout(p) -> ReLU -> Linear(1024 -> classes), trained
with Adam (lr 1e-4) on batches of 1024, validated every 3 epochs; training stops after 20 checks
without improvement of the primary validation metric (or at 500 epochs) and the best-validation
parameters are tested. This mirrors hear-eval-kit with the restricted grid p in {0.1, 0.25}:
PyTorch `BatchNorm1d` (momentum 0.1, eps 1e-5, unbiased running variance), PyTorch `Linear` bias
initialisation with Xavier-normal weights, no input normalisation, the last partial batch kept.
The protocol and its sources: docs/reference.md#probe-protocol.

All members (grid x seeds) are one `vmap` of a per-member `lax.while_loop`, so each member stops
on its own (a stopped member keeps its state) and the loop ends when all have stopped.
"""
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from audiomaepp.errors import UserError
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks as tasks_lib

_BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
_BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The evaluation protocol; the defaults are the paper's restricted grid."""
  hidden_dim: int = 1024
  dropout_rates: tuple[float, ...] = (0.1, 0.25)  # the grid
  learning_rate: float = 1e-4
  batch_size: int = 1024
  max_epochs: int = 500
  validate_every: int = 3  # epochs between validation checks
  patience: int = 20  # checks without improvement before stopping
  # hear-eval-kit feeds embeddings unnormalised (its `embedding_norm` is Identity); True applies
  # a StandardScaler fitted on the training split instead.
  standardize: bool = False
  # Reshuffle the training examples every epoch. hear-eval-kit never reshuffles: it trains on the
  # order it stored when embedding (docs/evaluation.md); False keeps the rows' order, which
  # `heareval.arrange` sets.
  shuffle: bool = True

  @property
  def max_checks(self) -> int:
    """Validation checks within max_epochs; epochs after the last check could not be selected."""
    return self.max_epochs // self.validate_every


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitData:
  """One train/valid/test run: embeddings (n, D) and multi-hot targets (n, classes)."""
  train_x: np.ndarray
  train_y: np.ndarray
  valid_x: np.ndarray
  valid_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


@dataclasses.dataclass(frozen=True)
class ProbeRuns:
  """Outcome of every member of one run, each (grid, seeds); scores are fractions."""
  valid_score: np.ndarray  # best validation score
  test_score: np.ndarray  # test score of the best-validation parameters
  best_epoch: np.ndarray  # epoch of the best validation check
  epochs: np.ndarray  # epochs trained before stopping


def init_probe(seed: int, n_in: int, n_classes: int, hidden_dim: int = 1024):
  """Probe parameters and BatchNorm statistics: PyTorch `Linear` biases, Xavier-normal weights.

  Drawn with NumPy outside the compiled program (keeping random-number code out of it shortens
  compilation); float32 arrays in a nested dict.
  """
  rng = np.random.default_rng(seed)
  std_hidden = math.sqrt(2.0 / (n_in + hidden_dim))  # gain 1 (linear input)
  std_output = math.sqrt(2.0) * math.sqrt(2.0 / (hidden_dim + n_classes))  # gain sqrt(2) (ReLU)
  bound_hidden, bound_output = 1 / math.sqrt(n_in), 1 / math.sqrt(hidden_dim)
  f32 = lambda a: np.asarray(a, np.float32)
  params = {
      "hidden": {
          "kernel": f32(std_hidden * rng.standard_normal((n_in, hidden_dim), np.float32)),
          "bias": f32(rng.uniform(-bound_hidden, bound_hidden, hidden_dim)),
      },
      "norm": {"scale": np.ones(hidden_dim, np.float32), "bias": np.zeros(hidden_dim, np.float32)},
      "output": {
          "kernel": f32(std_output * rng.standard_normal((hidden_dim, n_classes), np.float32)),
          "bias": f32(rng.uniform(-bound_output, bound_output, n_classes)),
      },
  }
  batch_stats = {"mean": np.zeros(hidden_dim, np.float32), "var": np.ones(hidden_dim, np.float32)}
  return params, batch_stats


def probe_logits(params, batch_stats, x: jax.Array) -> jax.Array:
  """Inference logits (n, classes) from embeddings (n, D): BatchNorm uses running statistics."""
  h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  h = (h - batch_stats["mean"]) * jax.lax.rsqrt(batch_stats["var"] + _BN_EPSILON)
  h = jax.nn.relu(h * params["norm"]["scale"] + params["norm"]["bias"])
  return h @ params["output"]["kernel"] + params["output"]["bias"]


def train_logits(params, batch_stats, x: jax.Array, mask: jax.Array, dropout_rate: jax.Array,
                 key: jax.Array):
  """Training-mode logits (batch, classes) and updated BatchNorm statistics.

  Rows with mask 0 (padding of the last partial batch) are excluded from the batch statistics;
  their logits are meaningless and must be masked out of the loss.
  """
  h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  weight = mask[:, None]
  count = mask.sum()
  mean = (weight * h).sum(0) / count
  var = (weight * (h - mean) ** 2).sum(0) / count
  h = (h - mean) * jax.lax.rsqrt(var + _BN_EPSILON)
  h = h * params["norm"]["scale"] + params["norm"]["bias"]
  keep = jax.random.bernoulli(key, 1.0 - dropout_rate, h.shape)
  h = jax.nn.relu(jnp.where(keep, h / (1.0 - dropout_rate), 0.0))
  logits = h @ params["output"]["kernel"] + params["output"]["bias"]
  unbiased_var = var * count / jnp.maximum(count - 1.0, 1.0)
  new_stats = {
      "mean": (1 - _BN_MOMENTUM) * batch_stats["mean"] + _BN_MOMENTUM * mean,
      "var": (1 - _BN_MOMENTUM) * batch_stats["var"] + _BN_MOMENTUM * unbiased_var,
  }
  return logits, new_stats


class _State(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


class _Carry(NamedTuple):
  state: _State
  best_params: Any
  best_batch_stats: Any
  best_score: jax.Array
  best_check: jax.Array
  checks: jax.Array
  stale: jax.Array  # checks since the last improvement
  key: jax.Array


def _score(params, batch_stats, x, y, *, metric: str, multilabel: bool) -> jax.Array:
  """The metric of the inference-mode probe's predictions on (x, y)."""
  logits = probe_logits(params, batch_stats, x)
  predictions = jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits)
  return scores.METRICS[metric](predictions, y)


def _loss(params, batch_stats, x, y, mask, dropout_rate, key, *, multilabel: bool):
  """Masked mean training loss of a batch and the updated BatchNorm statistics."""
  logits, new_stats = train_logits(params, batch_stats, x, mask, dropout_rate, key)
  if multilabel:
    per_row = optax.sigmoid_binary_cross_entropy(logits, y).mean(-1)
  else:
    per_row = optax.softmax_cross_entropy(logits, y)
  return (per_row * mask).sum() / mask.sum(), new_stats


def _fit_member(params, batch_stats, key, dropout_rate, data: SplitData, *, config: ProbeConfig,
                metric: str, multilabel: bool):
  """Trains one probe with early stopping; returns its best validation score, that check's test
  score, the best check and the checks run."""
  n_train = data.train_x.shape[0]
  batch = min(config.batch_size, n_train)
  steps = -(-n_train // batch)
  optimizer = optax.adam(config.learning_rate)
  mask = (jnp.arange(steps * batch) < n_train).astype(jnp.float32).reshape(steps, batch)
  # One flat vector for parameters and statistics: the optimiser update and the early-stopping
  # bookkeeping become a few large operations instead of one per leaf, which shortens
  # compilation considerably.
  params, unravel_params = jax.flatten_util.ravel_pytree(params)
  batch_stats, unravel_stats = jax.flatten_util.ravel_pytree(batch_stats)

  def flat_loss(params, batch_stats, *args):
    loss, new_stats = _loss(unravel_params(params), unravel_stats(batch_stats), *args,
                            multilabel=multilabel)
    return loss, jax.flatten_util.ravel_pytree(new_stats)[0]

  def flat_score(params, batch_stats, x, y):
    return _score(unravel_params(params), unravel_stats(batch_stats), x, y, metric=metric,
                  multilabel=multilabel)

  def train_step(state, inputs):
    index, step_mask, step_key = inputs
    grads, new_stats = jax.grad(flat_loss, has_aux=True)(
        state.params, state.batch_stats, data.train_x[index], data.train_y[index], step_mask,
        dropout_rate, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return _State(optax.apply_updates(state.params, updates), new_stats, opt_state), None

  def train_epoch(state, epoch_keys):
    if config.shuffle:
      # Arg-sort of random 32-bit words: one random-number call site instead of the several of
      # `jax.random.permutation`, which keeps compilation short.
      order = jnp.argsort(jax.random.bits(epoch_keys[0], (n_train,)), stable=True)
    else:
      order = jnp.arange(n_train)
    index = jnp.pad(order, (0, steps * batch - n_train)).reshape(steps, batch)
    state, _ = jax.lax.scan(train_step, state, (index, mask, epoch_keys[1:]))
    return state, None

  def keep_training(carry):
    return (carry.checks < config.max_checks) & (carry.stale < config.patience)

  def check_round(carry):
    keys = jax.random.split(carry.key, 1 + config.validate_every * (1 + steps))
    epoch_keys = keys[1:].reshape(config.validate_every, 1 + steps)
    state, _ = jax.lax.scan(train_epoch, carry.state, epoch_keys)
    score = flat_score(state.params, state.batch_stats, data.valid_x, data.valid_y)
    # Strictly better, as PyTorch Lightning's EarlyStopping and ModelCheckpoint (mode 'max').
    improved = score > carry.best_score
    return _Carry(
        state=state,
        best_params=jnp.where(improved, state.params, carry.best_params),
        best_batch_stats=jnp.where(improved, state.batch_stats, carry.best_batch_stats),
        best_score=jnp.where(improved, score, carry.best_score),
        best_check=jnp.where(improved, carry.checks + 1, carry.best_check),
        checks=carry.checks + 1,
        stale=jnp.where(improved, 0, carry.stale + 1),
        key=keys[0])

  state = _State(params, batch_stats, optimizer.init(params))
  carry = _Carry(state, params, batch_stats, jnp.array(-jnp.inf), jnp.array(0), jnp.array(0),
                 jnp.array(0), key)
  carry = jax.lax.while_loop(keep_training, check_round, carry)
  test = flat_score(carry.best_params, carry.best_batch_stats, data.test_x, data.test_y)
  return carry.best_score, test, carry.best_check, carry.checks


@functools.partial(jax.jit, static_argnames=("config", "metric", "multilabel"))
def _fit_members(params, batch_stats, keys, dropout_rates, data: SplitData, *,
                 config: ProbeConfig, metric: str, multilabel: bool):
  """Trains one probe per member (leading axis of every argument but `data`).

  Returns per member: best validation score, its test score, the best check and checks run.
  """
  member = functools.partial(_fit_member, data=data, config=config, metric=metric,
                             multilabel=multilabel)
  return jax.vmap(member)(params, batch_stats, keys, dropout_rates)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Standardises (n, D) arrays with the train split's mean and std (as scikit-learn's
  StandardScaler: population std, constant features only centred); float32 results."""
  train64 = np.asarray(train, np.float64)
  mean, std = train64.mean(0), train64.std(0)
  std = np.where(std > 0, std, 1.0)
  return [((np.asarray(a, np.float64) - mean) / std).astype(np.float32) for a in (train, *others)]


def train_probes(data: SplitData, *, metric: str, multilabel: bool, seeds: Sequence[int],
                 config: ProbeConfig = ProbeConfig()) -> ProbeRuns:
  """Trains every (dropout rate, seed) probe of one run in one compiled program.

  Args:
    data: the run's embeddings and multi-hot targets.
    metric: a key of `scores.METRICS` (the task's primary metric) for early stopping and test.
    multilabel: sigmoid BCE loss if True, softmax cross-entropy otherwise.
    seeds: one probe per seed and grid point; a seed fixes initialisation and batch order.
    config: the protocol.
  Returns:
    ProbeRuns with arrays of shape (len(config.dropout_rates), len(seeds)).
  """
  if metric not in scores.METRICS:
    raise ValueError(
        f"metric {metric!r} is not supported; expected one of {sorted(scores.METRICS)}")
  sizes = {data.train_x.shape[1], data.valid_x.shape[1], data.test_x.shape[1]}
  if len(sizes) != 1:
    raise ValueError(f"train/valid/test embeddings differ in size: {sorted(sizes)}")
  arrays = [np.asarray(a, np.float32) for a in dataclasses.astuple(data)]
  if config.standardize:
    arrays[0], arrays[2], arrays[4] = standardize(arrays[0], arrays[2], arrays[4])
  grid, n_seeds = len(config.dropout_rates), len(seeds)
  n_in, n_classes = arrays[0].shape[1], arrays[1].shape[1]
  # Member order is grid-major; a seed fixes initialisation and batch order at every grid point.
  inits = [init_probe(int(s), n_in, n_classes, config.hidden_dim) for s in seeds]
  params, batch_stats = jax.tree.map(lambda *a: np.stack(a * grid), *inits)
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds] * grid)
  rates = np.repeat(np.asarray(config.dropout_rates, np.float32), n_seeds)
  outputs = _fit_members(params, batch_stats, keys, rates, SplitData(*arrays), config=config,
                         metric=metric, multilabel=multilabel)
  valid, test, best_check, checks = (np.asarray(o).reshape(grid, n_seeds) for o in outputs)
  return ProbeRuns(valid, test, best_check * config.validate_every, checks * config.validate_every)


@dataclasses.dataclass(frozen=True)
class TaskResult:
  """A task's evaluation: test score per seed (percent), its mean and 95% CI, and every run."""
  name: str
  metric: str
  prediction_type: str
  seeds: list[int]
  dropout_rates: list[float]
  seed_scores: list[float]  # percent; the mean over runs (folds) for fold-based tasks
  grid_choice: list[float]  # dropout rate chosen on validation, per seed
  mean: float
  ci: float
  runs: list[tuple[dict[str, list[str]], ProbeRuns]]
  wall_time_s: float

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable summary with every member's numbers."""
    return {
        "metric": self.metric,
        "prediction_type": self.prediction_type,
        "seeds": self.seeds,
        "dropout_rates": self.dropout_rates,
        "mean": self.mean,
        "ci": None if math.isnan(self.ci) else self.ci,
        "seed_scores": self.seed_scores,
        "grid_choice": self.grid_choice,
        "wall_time_s": self.wall_time_s,
        "runs": [{
            **split,
            "valid_scores": (100 * r.valid_score).tolist(),
            "test_scores": (100 * r.test_score).tolist(),
            "best_epochs": r.best_epoch.tolist(),
            "epochs": r.epochs.tolist(),
        } for split, r in self.runs],
    }


def evaluate_task(task: tasks_lib.TaskEmbeddings, seeds: Sequence[int],
                  config: ProbeConfig = ProbeConfig()) -> TaskResult:
  """Runs the protocol on one task and aggregates over seeds.

  As in hear-eval-kit, each seed's grid point is the one with the best validation score of the
  first run (for fold-based tasks the run testing on the first fold) and is used for every run;
  a seed's score is its mean test score over runs.
  """
  start = time.perf_counter()
  metric = tasks_lib.primary_metric(task.metadata)
  if metric not in scores.METRICS:
    raise UserError(f"{task.name}: primary metric {metric!r} is not supported; "
                     f"expected one of {sorted(scores.METRICS)}")
  runs = []
  splits = tasks_lib.data_splits(task.metadata)
  for i, split in enumerate(splits):
    data = SplitData(
        task.embeddings(split["train"]), task.targets(split["train"]),
        task.embeddings(split["valid"]), task.targets(split["valid"]),
        task.embeddings(split["test"]), task.targets(split["test"]))
    run_start = time.perf_counter()
    result = train_probes(data, metric=metric, multilabel=task.multilabel, seeds=seeds,
                          config=config)
    logging.info("%s: run %d/%d (train %d, valid %d, test %d, dim %d): %d probes, %.1f s, "
                 "test %s %.2f", task.name, i + 1, len(splits), len(data.train_x),
                 len(data.valid_x), len(data.test_x), data.train_x.shape[1], result.test_score.size,
                 time.perf_counter() - run_start, metric, 100 * result.test_score.mean())
    runs.append((split, result))
  seeds = [int(s) for s in seeds]
  choice = np.argmax(runs[0][1].valid_score, axis=0)  # first maximum, as a stable sort would
  per_seed = np.mean([r.test_score[choice, np.arange(len(seeds))] for _, r in runs], axis=0)
  seed_scores = [float(100 * s) for s in per_seed]
  mean, ci = scores.confidence_interval(seed_scores)
  return TaskResult(
      name=task.name, metric=metric, prediction_type=task.metadata["prediction_type"],
      seeds=seeds, dropout_rates=[float(p) for p in config.dropout_rates],
      seed_scores=seed_scores, grid_choice=[float(config.dropout_rates[c]) for c in choice],
      mean=mean, ci=ci, runs=runs, wall_time_s=time.perf_counter() - start)
