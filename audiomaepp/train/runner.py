"""The runner every kind of training runs on: pretraining and fine-tuning are `Task`s.

`run(task, workdir)` owns what is the same for every task: the checks before anything is
written, the mesh and the placement of the sharded state, the restore (one decision for all
hosts: `checkpointing.restore_with_fallback`) or the initial state (with a task's pretrained
parameters), the step loop with its log / checkpoint / evaluation / best-checkpoint cadence,
SIGTERM, the profiler window, metrics, and cleanup that never replaces the error that ended the
run. A task gives its model and optimiser, its pure train step, its batches, its evaluation and
what it does at the end. Guarantees (see docs/reliability.md):
  * resume: a run restarted on the same workdir continues from the newest intact checkpoint with
    the same batches (step s trains on global batch s - 1, whatever the number of hosts or Grain
    workers) and random draws (fold_in(seed key, step)), so losses are bit-identical to an
    uninterrupted run on CPU, also when it resumes on another host count;
  * SIGTERM: the run checkpoints the current step and stops (`RunResult.preempted`);
  * a non-finite loss or gradient norm stops the run before it is checkpointed, so the latest
    checkpoint stays the last good one;
  * a failed checkpoint write (disk full, ...) is reported and its partial files removed; the
    previous checkpoint stays restorable;
  * a bad config, a workdir that is a file or not writable, or a workdir whose checkpoints hold
    another model, fails in one line before anything is compiled or written; config.json is
    rewritten only once the run is accepted.
"""
import abc
import dataclasses
import math
import os
import signal
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

import audiomaepp
from audiomaepp import checkpointing
from audiomaepp import metrics as metrics_lib
from audiomaepp import models
from audiomaepp import parallel
from audiomaepp import profiling
from audiomaepp import visualize
from audiomaepp.data import pipeline
from audiomaepp.errors import UserError
from audiomaepp.train import optim
from audiomaepp.train import state as state_lib
from audiomaepp.train import workdir as workdir_lib
from audiomaepp.train.checkpointer import BestCheckpoint, Checkpointer
from audiomaepp.train.workdir import ConfigError, TrainingError

LOSS_CURVE_FILE = "loss_curve.png"
TrainState = state_lib.TrainState


class NonFiniteLossError(TrainingError):
  """The loss or gradient norm became NaN/inf."""


class CheckpointError(TrainingError):
  """The final checkpoint could not be written."""


@dataclasses.dataclass
class RunResult:
  """What a run did: the last step trained, the latest checkpoint and whether SIGTERM stopped it."""
  step: int
  checkpoint_step: Optional[int]
  preempted: bool = False
  final_loss: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: the mesh and its axis rules, the train state's shardings, the
  sharding of global batches and this host's block of their rows (`pipeline.host_block`)."""
  mesh: jax.sharding.Mesh
  rules: Any
  state: TrainState
  batch: jax.sharding.NamedSharding
  block: tuple[int, int]

  @classmethod
  def create(cls, mesh: jax.sharding.Mesh, rules: Any, shardings: TrainState,
             batch_size: int) -> "Placement":
    """The placement of global batches of `batch_size` on `mesh` under `rules`."""
    batch = parallel.batch_sharding(mesh, rules)
    return cls(mesh, rules, shardings, batch, pipeline.host_block(batch, batch_size))

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return parallel.replicated(self.mesh)

  def global_batch(self, host_rows: dict) -> dict:
    """This host's rows (NumPy) -> one global batch of `jax.Array`s."""
    return pipeline.make_global_batch(host_rows, self.batch)

  def jit(self, fn: Callable, in_shardings: Any, out_shardings: Any,
          donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`fn` jitted with explicit shardings, traced under the mesh's logical-axis rules."""
    return jax.jit(parallel.with_axis_rules(fn, self.mesh, self.rules),
                   in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)


class Task(abc.ABC):
  """One kind of training on the runner. The runner calls, in order: `validate`, `open_data`,
  `optimizer`, `init_params` (abstractly, for the shardings), `pretrained_params` (fresh runs
  only), `record`, `train_step`, `start`, then per step `train_batches` and at the cadence
  `evaluate`; `finish` after the last step; `close` always."""

  # Keys of a training batch, each (batch, ...) and sharded over the batch axis.
  batch_keys: tuple[str, ...] = ("spectrogram",)
  # Whether `evaluate`'s 'score' (higher is better) selects a best checkpoint (`workdir/best/`).
  keeps_best: bool = False
  # Whether the state keeps a moving average of the parameters (`TrainState.ema_params`).
  ema: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def validate(self) -> models.ModelConfig:
    """Checks the config (`validate_common` and the task's own fields) before anything is read;
    raises ConfigError."""

  @abc.abstractmethod
  def open_data(self, workdir: str) -> int:
    """Opens the data (building what must be built) and checks that `workdir` may resume with
    it; returns the number of training examples. Raises ConfigError."""

  @abc.abstractmethod
  def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimiser of the run, with the learning-rate `schedule`."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """Freshly initialised parameters, boxed with their logical-axis metadata (pure)."""

  def pretrained_params(self, abstract_params: Any) -> Optional[dict[str, Any]]:
    """Top-level parameter subtrees to start from instead of the random ones (host arrays), or
    None. Called only when the run does not resume."""
    del abstract_params
    return None

  def record(self) -> ml_collections.ConfigDict:
    """The experiment record written to config.json."""
    return self.config

  def flops_per_sample(self) -> Optional[float]:
    """Training FLOPs per example, for the model FLOPs utilisation (None: not reported)."""
    return None

  @abc.abstractmethod
  def train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule
                 ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The pure step (state, global batch, base key) -> (state, metrics with 'loss',
    'grad_norm' and 'lr')."""

  def start(self, placement: Placement, writer: metrics_lib.MetricsWriter, workdir: str) -> None:
    """Compiles the evaluation and prepares its data, once the state is placed."""

  @abc.abstractmethod
  def train_batches(self, start_step: int, block: tuple[int, int]) -> Iterator[dict]:
    """This host's rows (`block`) of the training batches of steps start_step + 1, ...: step s
    trains on global batch s - 1; the runner takes `batch_keys` of each. The iterator has
    `close()`."""

  def evaluates_at(self, step: int, total_steps: int) -> bool:
    """Whether `evaluate` runs after `step`: every `eval_every_steps` and at the last step."""
    return due(step, self.config.eval_every_steps, total_steps)

  def evaluate(self, state: TrainState, step: int) -> Optional[dict[str, Any]]:
    """Evaluates `state` at `step` and writes its metrics; None when the task does not
    evaluate. A 'score' (higher is better) is offered to the best checkpoint; the result is
    recorded with a checkpoint of the same step (`checkpointing.saved_record`)."""
    del state, step
    return None

  def finish(self, state: TrainState, result: RunResult,
             best: Optional[BestCheckpoint]) -> None:
    """Runs once after the last step of a run that was not preempted."""

  def close(self) -> None:
    """Releases what `start` opened (iterators, workers)."""


def validate_common(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The checks every task shares: the model, the step counts and intervals, `profile_steps`,
  the batch against the devices and processes, the crop, the mesh.

  Raises:
    ConfigError: one line naming the field and what was expected.
  """
  try:
    model_config = models.resolve_model_config(config.model)
  except UserError as e:
    raise ConfigError(str(e)) from None
  num_devices, num_processes = jax.device_count(), jax.process_count()
  for name in ("batch_size", "grad_accum_steps", "log_every_steps", "checkpoint_every_steps",
               "eval_every_steps", "keep_checkpoints"):
    if int(config[name]) <= 0:
      raise ConfigError(f"config.{name}={config[name]}: expected a positive integer")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("config.num_train_steps and config.num_epochs are both <= 0: set one")
  try:
    profiling.parse_steps(config.profile_steps)
  except UserError as e:
    raise ConfigError(str(e)) from None
  if config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{num_devices} devices")
  if config.batch_size % num_processes:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{num_processes} processes")
  if config.data.crop_frames != model_config.input_shape[0]:
    raise ConfigError(f"config.data.crop_frames={config.data.crop_frames} differs from "
                      f"config.model.input_shape[0]={model_config.input_shape[0]}")
  try:
    parallel.mesh_shape(config.mesh, num_devices)
  except UserError as e:
    raise ConfigError(str(e)) from None
  return model_config


def state_shardings(task: Task, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    rules: Any) -> tuple[TrainState, TrainState]:
  """(abstract TrainState, its NamedShardings) for `mesh` and the logical axis `rules`:
  parameters as their logical axes say, optimiser moments and the moving average like the
  parameters, counters replicated."""
  boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  abstract_state = jax.eval_shape(
      lambda rng: state_lib.new_state(models.unbox(task.init_params(rng)), tx, task.ema),
      jax.random.PRNGKey(0))
  params = parallel.param_shardings(boxed, mesh, rules)
  replicated = parallel.replicated(mesh)
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  shardings = TrainState(step=replicated, params=params, opt_state=opt_state,
                         ema_params=params if task.ema else {})
  return abstract_state, shardings


def initial_state(task: Task, tx: optax.GradientTransformation, shardings: TrainState,
                  rng: jax.Array, pretrained: Optional[dict[str, Any]] = None) -> TrainState:
  """A freshly initialised TrainState, created directly with its shardings; the `pretrained`
  subtrees replace the random ones. The key and the pretrained arrays are placed first (each
  with its own sharding: with FSDP never whole on one device), on every process."""
  rng = jax.device_put(jax.device_get(rng), shardings.step)
  if pretrained is not None:
    pretrained = jax.device_put(jax.device_get(pretrained),
                                {name: shardings.params[name] for name in pretrained})

  def create(rng, pretrained):
    params = models.unbox(task.init_params(rng))
    if pretrained is not None:
      params = {**params, **pretrained}
    return state_lib.new_state(params, tx, task.ema)

  return jax.jit(create, out_shardings=shardings)(rng, pretrained)


def compile_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                       placement: Placement) -> Callable:
  """The task's train step jitted with the placement's shardings; the input state is donated."""
  batch = {key: placement.batch for key in task.batch_keys}
  return placement.jit(task.train_step(tx, schedule),
                       in_shardings=(placement.state, batch, placement.replicated),
                       out_shardings=(placement.state, placement.replicated), donate_argnums=(0,))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `abstract`'s shapes and dtypes with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


class PreemptionWatcher:
  """Notices SIGTERM. One process: a signal handler sets a flag. Several processes: JAX's
  preemption sync point, so that every host saves at the same step."""

  def __init__(self, manager: Any):
    self._manager = manager
    self._flag = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("signal %d received: checkpointing and stopping after this step", signum)
    self._flag.set()

  def requested(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (the same answer on every host)."""
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self._flag.is_set()

  def close(self) -> None:
    """Puts the previous SIGTERM handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def close_all(closers: list[Callable[[], Any]], ending_error: Optional[BaseException]) -> None:
  """Calls every closer. While `ending_error` ends the run, a closer's failure is logged and the
  rest still run: cleanup never replaces the error that ended the run. Otherwise the first
  failure is raised once every closer has run."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if ending_error is None and first is None:
        first = e
      else:
        logging.exception("cleanup (%s) failed too", getattr(close, "__qualname__", close))
  if first is not None:
    raise first


def check_finite(records: list[dict[str, float]], first_step: int,
                 checkpoint_step: Optional[int]) -> None:
  """Raises NonFiniteLossError naming the first step whose loss or gradient norm is not finite."""
  for offset, record in enumerate(records):
    if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
      raise NonFiniteLossError(
          f"loss {record['loss']} (gradient norm {record['grad_norm']}) at step "
          f"{first_step + offset}: stopping without checkpointing it; the latest checkpoint "
          f"(step {checkpoint_step}) is the last good state. Lower base_lr, set grad_clip_norm, "
          "or train in float32, then restart to resume from it")


def summarise(records: list[dict[str, float]]) -> dict[str, float]:
  """Mean loss and gradient norm over a log window; the latest learning rate."""
  return {"loss": float(np.mean([r["loss"] for r in records])),
          "grad_norm": float(np.mean([r["grad_norm"] for r in records])),
          "lr": float(records[-1]["lr"])}


def due(step: int, every: int, total_steps: int) -> bool:
  """Whether a periodic action (log, checkpoint, eval every `every` steps) runs at `step`: on
  multiples of `every` and at the last step."""
  return step % every == 0 or step == total_steps


def plot_loss_curve(workdir: str) -> None:
  """Draws the loss curve; a picture that cannot be drawn (disk full) is a warning, not an error
  of the run, whose checkpoints and metrics are written."""
  try:
    visualize.plot_loss_curve_from_workdir(workdir, os.path.join(workdir, LOSS_CURVE_FILE))
  except Exception:  # pylint: disable=broad-except
    logging.exception("the loss curve could not be drawn")


def _restore(checkpointer: Checkpointer, abstract_state: TrainState, shardings: TrainState,
             workdir: str, config: ml_collections.ConfigDict
             ) -> Optional[checkpointing.Restored]:
  """The newest intact checkpoint of the workdir, decided once for every host; a train state of
  another structure is one line naming the config fields that differ. Every other problem
  propagates as `checkpointing` classifies it (docs/reliability.md, restore semantics)."""
  abstract_params, abstract_rest = abstract_state.checkpoint_items()
  params_sh, rest_sh = shardings.checkpoint_items()
  try:
    return checkpointing.restore_with_fallback(
        checkpointer.manager, with_shardings(abstract_params, params_sh),
        with_shardings(abstract_rest, rest_sh))
  except checkpointing.StructureMismatchError as e:
    raise workdir_lib.structure_error(workdir, config, e) from None


def run(task: Task, workdir: str, on_step: Optional[Callable[[int], None]] = None) -> RunResult:
  """Trains (or resumes) `task` in `workdir`; see the module docstring for the guarantees.

  `on_step(step)` is called as each step starts (main.py's host-loss report names it).
  """
  config = task.config
  model_config = task.validate()
  workdir_lib.check_workdir(workdir)
  workdir_lib.check_same_model(workdir, model_config)
  num_train = task.open_data(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir_lib.check_writable(workdir)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.axis_rules(config)
  total_steps = optim.total_train_steps(config, num_train)
  schedule = optim.learning_rate_schedule(config, num_train, total_steps)
  tx = task.optimizer(schedule)
  abstract_state, shardings = state_shardings(task, tx, mesh, rules)
  placement = Placement.create(mesh, rules, shardings, config.batch_size)
  logging.info("audiomaepp %s, %s: %s params, mesh %s, %d train examples, %d steps of batch %d",
               audiomaepp.__version__, type(task).__name__,
               f"{optim.count_params(abstract_state.params):,}", dict(mesh.shape), num_train,
               total_steps, config.batch_size)

  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  closers: list[Callable[[], Any]] = []
  ending_error = None
  try:
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    closers.append(checkpointer.close)
    restored = _restore(checkpointer, abstract_state, shardings, workdir, config)
    pretrained = None if restored else task.pretrained_params(abstract_state.params)
    if is_main:  # only now that the run is accepted
      workdir_lib.record_config(workdir, task.record())
    if restored is None:
      state, start_step = initial_state(task, tx, shardings, init_rng, pretrained), 0
    else:
      state = TrainState.from_checkpoint_items(restored.params, restored.train_state)
      start_step = restored.step
      logging.info("resumed from checkpoint step %d", start_step)
    best = BestCheckpoint(workdir) if task.keeps_best else None
    if best is not None:
      closers.append(best.close)
    writer = metrics_lib.MetricsWriter(workdir, start_step, enabled=is_main,
                                       total_steps=total_steps)
    closers.append(writer.close)
    train_fn = compile_train_step(task, tx, schedule, placement)
    closers.append(task.close)
    task.start(placement, writer, workdir)
    train_input = task.train_batches(start_step, placement.block)
    closers.append(train_input.close)
    watcher = PreemptionWatcher(checkpointer.manager)
    closers.append(watcher.close)
    profiler = profiling.StepProfiler(config.profile_steps, workdir)
    closers.append(profiler.close)
    result = _train(task, state, train_fn, train_input, placement, start_step, total_steps,
                    train_rng, checkpointer, best, writer, watcher, profiler, on_step)
  except BaseException as e:
    ending_error = e
    raise
  finally:
    close_all(closers[::-1], ending_error)
    if is_main and (checkpointing.workdir_path(workdir) / metrics_lib.METRICS_FILE).exists():
      plot_loss_curve(workdir)
  if result.preempted:
    logging.warning("stopped by SIGTERM at step %d; checkpoint %s written, restart to resume",
                    result.step, result.checkpoint_step)
  else:
    logging.info("done: step %d, checkpoint %s", result.step, result.checkpoint_step)
  return result


def _train(task: Task, state: TrainState, train_fn: Callable, train_input: Iterator[dict],
           placement: Placement, start_step: int, total_steps: int, train_rng: jax.Array,
           checkpointer: Checkpointer, best: Optional[BestCheckpoint],
           writer: metrics_lib.MetricsWriter, watcher: PreemptionWatcher,
           profiler: profiling.StepProfiler, on_step: Optional[Callable[[int], None]]
           ) -> RunResult:
  """The step loop: train, fetch metrics only at log and checkpoint steps, log, checkpoint,
  evaluate, stop on SIGTERM; then wait for the last save and let the task finish."""
  config = task.config
  rng = jax.device_put(train_rng, placement.replicated)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_flops)
  throughput = metrics_lib.Throughput(
      global_batch=config.batch_size, flops_per_sample=task.flops_per_sample(),
      peak_flops_total=peak * jax.device_count() if peak else None,
      total_steps=total_steps, start_step=start_step)
  result = RunResult(step=start_step, checkpoint_step=checkpointer.latest_step())
  pending, window = [], []
  for step in range(start_step + 1, total_steps + 1):
    if on_step is not None:
      on_step(step)
    host_rows = next(train_input)
    batch = placement.global_batch({key: host_rows[key] for key in task.batch_keys})
    profiler.before(step)
    state, step_metrics = train_fn(state, batch, rng)
    profiler.after(step, step_metrics)
    pending.append(step_metrics)
    if step == start_step + 1:
      # Rates should not include compilation: time from the end of the first step.
      jax.block_until_ready(step_metrics)
      throughput.restart(step)
    result.step = step
    log_now = due(step, config.log_every_steps, total_steps)
    save_now = due(step, config.checkpoint_every_steps, total_steps)
    stop_now = watcher.requested(step)
    if log_now or save_now or stop_now:
      # The only host syncs: metrics are fetched at log and checkpoint steps.
      fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
      check_finite(fetched, step - len(fetched) + 1, checkpointer.latest_step())
      window.extend(fetched)
      pending = []
      result.final_loss = fetched[-1]["loss"]
    if log_now:
      writer.write_scalars(step, {**summarise(window), **throughput.update(step)})
      window = []
    # Evaluation first, so that a checkpoint of the same step records its scores; none when
    # SIGTERM asks to stop.
    scores = None if stop_now or not task.evaluates_at(step, total_steps) else task.evaluate(
        state, step)
    if save_now or stop_now:
      checkpointer.save(step, state, record=scores)
    if stop_now:
      result.preempted = True
      break
    if scores is not None:
      if best is not None and best.offer(step, state.eval_params(), scores["score"]):
        logging.info("best validation score so far: %.4f at step %d", scores["score"], step)
      throughput.restart(step)
  error = checkpointer.wait()
  result.checkpoint_step = checkpointer.latest_step()
  if error and result.checkpoint_step != result.step:
    raise CheckpointError(error)
  if not result.preempted:
    task.finish(state, result, best)
  return result

