"""The pretraining loop: validate the config, build the sharded state, train, log, checkpoint.

`run(config, workdir)` is what `main.py` calls. I/O, clocks and signals live here; the steps in
`step.py` are pure. Reliability guarantees (see docs/reliability.md):
  * resume: a run restarted on the same workdir continues from the newest intact checkpoint, with
    the same data (step s trains on global batch s - 1, whatever the number of hosts or Grain
    workers: see data/pipeline.py) and masks (fold_in(seed key, step)), so losses are
    bit-identical to an uninterrupted run on CPU, also when it resumes on another host count;
  * SIGTERM: the run checkpoints the current step and stops (`RunResult.preempted`);
  * a non-finite loss or gradient norm stops the run before it is checkpointed, so the latest
    checkpoint stays the last good one;
  * a failed checkpoint write (disk full, ...) is reported and its partial files removed; the
    previous checkpoint stays restorable;
  * resuming with another model than the one recorded in config.json is refused before anything is
    restored or written; config.json is rewritten only once the run is accepted (restored);
  * a workdir that is a file or not writable, or a dataset without the (non-empty) train split or,
    when evaluating, eval split, fails before anything is compiled.
"""
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import signal
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import traverse_util

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
from audiomaepp.train import step as step_lib

RECONSTRUCTION_DIR = "reconstructions"
LOSS_CURVE_FILE = "loss_curve.png"
# Eval masks come from this fixed stream (folded with the batch index), the same at every eval.
EVAL_MASK_STREAM = 0x5EED


class TrainingError(UserError):
  """A run that cannot start or continue; the message is one line for the user (every CLI
  prints it as `error: <message>`)."""


class ConfigError(TrainingError):
  """The config is invalid (found before anything is compiled)."""


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


def validate_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """Checks the config against the devices and the data before anything is compiled.

  Raises:
    ConfigError: one line naming the field and what was expected.
  """
  model_config = validate_common(config)
  _check_data(config)
  return model_config


def validate_common(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The checks pretraining and fine-tuning share: the model, the step counts and intervals,
  `profile_steps`, the batch against the devices and processes, the crop, the mesh.

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


def _check_data(config: ml_collections.ConfigDict) -> None:
  """The dataset must exist (TFDS shards) and hold the train split and, when the run evaluates
  (`eval_batches` > 0), the eval split, both non-empty. The built-in corpora are built later, by
  `run`, with both splits."""
  data = config.data
  if data.source in pipeline.BUILT_IN:
    return
  try:
    path = pipeline.dataset_path(data)
  except UserError as e:
    raise ConfigError(str(e)) from None
  splits = {"train_split": data.train_split}
  if config.eval_batches > 0:
    splits["eval_split"] = data.eval_split
  for field, split in splits.items():
    try:
      problem = (f"split {split!r} of {path} is empty"
                 if pipeline.num_examples(data, split) == 0 else None)
    except UserError as e:  # no such split
      problem = str(e)
    if problem:
      hint = ("; set --config.eval_batches=0 to train without evaluation"
              if field == "eval_split" else "")
      raise ConfigError(f"config.data.{field}={split!r}: {problem}{hint}")


# Model fields that change how the model is computed, not what: they may differ on resume.
_IMPLEMENTATION_FIELDS = ("remat", "attention_impl")


def _check_workdir(workdir: str) -> None:
  """--workdir must be a directory (new, or of an earlier run)."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir={workdir} is a file; expected a directory (a new one, or the "
                      "workdir of an earlier run to resume)")


def _check_writable(workdir: str) -> None:
  """Creates the workdir if needed and checks that files can be written into it."""
  path = epath.Path(workdir)
  probe = path / f".write_test.{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e}): checkpoints "
                      "and metrics cannot be saved there; use a writable directory") from None


def _check_same_model(workdir: str, model_config: models.ModelConfig) -> None:
  """A workdir's checkpoints resume only with the model recorded in its config.json: another
  architecture fails to restore, or (same parameter shapes, e.g. other num_heads) silently
  computes something else. Fields in `_IMPLEMENTATION_FIELDS` may change."""
  checkpoint_dir = epath.Path(workdir) / checkpointing.CHECKPOINT_DIR
  record = epath.Path(workdir) / checkpointing.CONFIG_FILE
  if not (record.exists() and checkpoint_dir.is_dir()
          and any(p.name.isdigit() for p in checkpoint_dir.iterdir())):
    return
  try:
    recorded = models.resolve_model_config(checkpointing.load_config(workdir).model)
  except UserError as e:
    raise ConfigError(f"{record}: the recorded model is not valid ({e}); use a new workdir"
                      ) from None
  if recorded.scan_layers != model_config.scan_layers:
    raise ConfigError(
        f"the checkpoints in {workdir} hold "
        f"{'stacked' if recorded.scan_layers else 'per-block'} layers: resume with "
        f"--config.model.scan_layers={recorded.scan_layers}, or use a new workdir")
  changed = [f.name for f in dataclasses.fields(recorded)
             if f.name not in ("size", *_IMPLEMENTATION_FIELDS)
             and getattr(recorded, f.name) != getattr(model_config, f.name)]
  if changed:
    differences = ", ".join(f"{name}={getattr(model_config, name)!r} (recorded "
                            f"{getattr(recorded, name)!r})" for name in changed)
    raise ConfigError(f"config.model differs from the model the checkpoints in {workdir} were "
                      f"trained with: {differences}; resume with the recorded model, or use a "
                      "new workdir")


# Fields outside the model that shape the optimiser state (`optim.create_optimizer`).
_OPTIMISER_STRUCTURE_FIELDS = ("grad_clip_norm", "grad_accum_steps")


def _structure_error(workdir: str, config: ml_collections.ConfigDict,
                     error: Exception) -> ConfigError:
  """The one-line error for checkpoints whose train state has another structure than `config`
  builds: names the optimiser fields that differ from those recorded in config.json."""
  recorded = (checkpointing.load_config(workdir)
              if (checkpointing.workdir_path(workdir) / checkpointing.CONFIG_FILE).exists()
              else ml_collections.ConfigDict())
  changed = [f"config.{name}={config[name]!r} (recorded {recorded[name]!r})"
             for name in _OPTIMISER_STRUCTURE_FIELDS
             if name in recorded and recorded[name] != config[name]]
  if changed:
    return ConfigError(f"the optimiser state in the checkpoints of {workdir} has another "
                       f"structure than this config's: {', '.join(changed)}; resume with the "
                       "recorded values, or use a new workdir")
  return ConfigError(f"{error}; resume with the config the checkpoints were written with, or use "
                     "a new workdir")


def _record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, warning about fields that differ from the config of an earlier run."""
  if (checkpointing.workdir_path(workdir) / checkpointing.CONFIG_FILE).exists():
    flat = lambda c: traverse_util.flatten_dict(json.loads(c.to_json_best_effort()), sep=".")
    before, now = flat(checkpointing.load_config(workdir)), flat(config)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
      logging.warning("config differs from the one recorded in %s in %s; recording the new one",
                      workdir, changed)
  checkpointing.save_config(workdir, config)


def state_shardings(model: Any, tx: Any, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict) -> tuple[Any, step_lib.TrainState]:
  """(abstract TrainState, its NamedShardings) for `mesh` and the config's logical axis rules."""
  input_shape = tuple(model.config.input_shape)
  create = functools.partial(step_lib.create_train_state, model, tx, input_shape=input_shape)
  abstract_state = jax.eval_shape(create, jax.random.PRNGKey(0))
  boxed = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(0)},
                         jnp.zeros((1, *input_shape), jnp.float32)))["params"]
  params = parallel.param_shardings(boxed, mesh, parallel.axis_rules(config))
  replicated = parallel.replicated(mesh)
  # Optimiser moments mirror the parameters (and take their shardings); counters are replicated.
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  shardings = step_lib.TrainState(step=replicated, params=params, opt_state=opt_state)
  return abstract_state, shardings


def init_train_state(model: Any, tx: Any, shardings: step_lib.TrainState,
                     rng: jax.Array) -> step_lib.TrainState:
  """A freshly initialised TrainState, created directly with its shardings."""
  create = functools.partial(step_lib.create_train_state, model, tx,
                             input_shape=tuple(model.config.input_shape))
  return jax.jit(create, out_shardings=shardings)(rng)


def compile_train_step(model: Any, tx: Any, schedule: Any, grad_accum_steps: int,
                       shardings: step_lib.TrainState, mesh: jax.sharding.Mesh,
                       rules: Optional[Any] = None):
  """`step.train_step` jitted with explicit shardings under the logical-axis `rules`
  (`parallel.axis_rules(config)`; None: the batch over every mesh axis); the input state is
  donated."""
  fn = functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                         grad_accum_steps=grad_accum_steps)
  fn = parallel.with_axis_rules(fn, mesh, rules)
  batch = {"spectrogram": parallel.batch_sharding(mesh, rules)}
  replicated = parallel.replicated(mesh)
  return jax.jit(fn, in_shardings=(shardings, batch, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def compile_eval_step(model: Any, params_shardings: Any, mesh: jax.sharding.Mesh,
                      rules: Optional[Any] = None):
  """`step.eval_step` jitted with explicit shardings under the logical-axis `rules`."""
  fn = parallel.with_axis_rules(functools.partial(step_lib.eval_step, model=model), mesh, rules)
  batch = {"spectrogram": parallel.batch_sharding(mesh, rules)}
  replicated = parallel.replicated(mesh)
  return jax.jit(fn, in_shardings=(params_shardings, batch, replicated),
                 out_shardings=replicated)


class _PreemptionWatcher:
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
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class _Checkpointer:
  """Saves train states asynchronously and reports failed writes without stopping training."""

  def __init__(self, workdir: str, keep: int):
    self.manager = checkpointing.training_manager(workdir, keep)
    self._workdir = workdir
    self._pending: Optional[int] = None

  def wait(self) -> Optional[str]:
    """Waits for the save in flight; returns an error message if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    return None

  def save(self, step: int, state: step_lib.TrainState) -> Optional[str]:
    """Starts saving `state` as `step` after the previous save finished; returns an error."""
    error = self.wait()
    params, rest = state.checkpoint_items()
    try:
      checkpointing.save_train_state(self.manager, step, params, rest)
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    self._pending = step
    return error

  def _failed(self, step: Optional[int], error: BaseException) -> str:
    """Removes what the failed save of `step` wrote; logs and returns the report."""
    if step is not None:
      checkpointing.discard_failed_save(self.manager, step)
    # From storage: after a failed background save Orbax's own step list may have dropped the
    # previous step (keep_checkpoints=1), which is still on disk and restorable.
    latest = checkpointing.latest_complete_step(self._workdir)
    message = (f"checkpoint save at step {step} failed ({describe_error(error)}); "
               f"latest complete checkpoint: {latest}")
    logging.error(message)
    return message

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def close(self) -> None:
    self.wait()
    self.manager.close()


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def describe_error(error: BaseException, limit: int = 400) -> str:
  """'<type>: <cause>: <first line>' for a failed write.

  The cause ('No space left on device', 'File too large') comes first: TensorStore names it only
  by its errno (`os_error_code='27'`) at the end of a long line of paths and JSON specs.
  """
  text = str(error).strip()
  line = text.splitlines()[0] if text else ""
  if len(line) > limit:
    line = f"{line[:limit // 2]} ... {line[-limit // 2:]}"
  code = getattr(error, "errno", None)
  if code is None:
    match = _OS_ERROR_CODE.search(text)
    code = int(match.group(1)) if match else None
  cause = os.strerror(code) if code else ""
  prefix = f"{cause}: " if cause and cause not in line else ""
  return f"{type(error).__name__}: {prefix}{line}"


def _check_finite(records: list[dict[str, float]], first_step: int,
                  checkpoint_step: Optional[int]) -> None:
  """Raises NonFiniteLossError naming the first step whose loss or gradient norm is not finite."""
  for offset, record in enumerate(records):
    if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
      raise NonFiniteLossError(
          f"loss {record['loss']} (gradient norm {record['grad_norm']}) at step "
          f"{first_step + offset}: stopping without checkpointing it; the latest checkpoint "
          f"(step {checkpoint_step}) is the last good state. Lower base_lr, set grad_clip_norm, "
          "or train in float32, then restart to resume from it")


def _summarise(records: list[dict[str, float]]) -> dict[str, float]:
  """Mean loss and gradient norm over a log window; the latest learning rate."""
  return {"loss": float(np.mean([r["loss"] for r in records])),
          "grad_norm": float(np.mean([r["grad_norm"] for r in records])),
          "lr": float(records[-1]["lr"])}


def _due(step: int, every: int, total_steps: int) -> bool:
  """Whether a periodic action (log, checkpoint, eval every `every` steps) runs at `step`: on
  multiples of `every` and at the last step."""
  return step % every == 0 or step == total_steps


def _train_input(config: ml_collections.ConfigDict, start_step: int,
                 block: tuple[int, int]) -> Iterator[dict]:
  """This host's rows (`block`: `pipeline.host_block`) of the training batches of steps
  `start_step + 1`, ...: step s trains on global batch s - 1, on any number of hosts."""
  iterator = pipeline.create_iterator(
      config.data, split=config.data.train_split, batch_size=config.batch_size,
      seed=config.seed, train=True, first_batch=start_step, shard_index=block[0],
      shard_count=block[1])
  try:
    for batch in iterator:
      yield {"spectrogram": np.asarray(batch["spectrogram"], np.float32)}
  finally:
    iterator.close()


class _EvalInput:
  """This host's rows of the first `config.eval_batches` global batches of the eval split, the
  same at every evaluation: one iterator (with its Grain workers), made at the first eval."""

  def __init__(self, config: ml_collections.ConfigDict, block: tuple[int, int]):
    self._config = config
    self._block = block
    self._iterator = None

  def batches(self) -> Iterator[dict]:
    if self._iterator is None:
      self._iterator = pipeline.create_iterator(
          self._config.data, split=self._config.data.eval_split,
          batch_size=self._config.batch_size, seed=self._config.seed, train=False,
          num_batches=self._config.eval_batches, shard_index=self._block[0],
          shard_count=self._block[1])
    return itertools.islice(self._iterator, self._config.eval_batches)

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()


def _evaluate(config: ml_collections.ConfigDict, eval_fn: Any, params: Any, step: int,
              mesh: jax.sharding.Mesh, eval_input: _EvalInput, workdir: str,
              writer: metrics_lib.MetricsWriter) -> float:
  """Validation loss over `eval_batches` held-out batches (fixed masks) and a reconstruction PNG."""
  sharding = parallel.batch_sharding(mesh, parallel.axis_rules(config))
  mask_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_MASK_STREAM)
  losses, first = [], None
  for index, batch in enumerate(eval_input.batches()):
    global_batch = pipeline.make_global_batch({"spectrogram": batch["spectrogram"]}, sharding)
    out = eval_fn(params, global_batch, jax.random.fold_in(mask_key, index))
    losses.append(out["loss"])
    if first is None:
      first = out
  loss = float(np.mean(jax.device_get(losses)))
  writer.write_scalars(step, {"loss": loss}, split="eval")
  if writer.enabled:
    first = jax.device_get(first)
    image = visualize.plot_reconstruction(
        first["spectrogram"], first["pixel_mask"], first["reconstruction"],
        os.path.join(workdir, RECONSTRUCTION_DIR, f"step_{step:08d}.png"),
        title=f"step {step}, eval loss {loss:.4f}")
    writer.write_image("eval/reconstruction", step, image)
  return loss


def _close_all(closers: list[Callable[[], Any]], ending_error: Optional[BaseException]) -> None:
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


def _plot_loss_curve(workdir: str) -> None:
  """Draws the loss curve; a picture that cannot be drawn (disk full) is a warning, not an error
  of the run, whose checkpoints and metrics are written."""
  try:
    visualize.plot_loss_curve_from_workdir(workdir, os.path.join(workdir, LOSS_CURVE_FILE))
  except Exception:  # pylint: disable=broad-except
    logging.exception("the loss curve could not be drawn")


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Optional[Callable[[int], None]] = None) -> RunResult:
  """Pretrains (or resumes) `config` in `workdir`; see the module docstring for guarantees.

  `on_step(step)` is called as each step starts (main.py's host-loss report names it).
  """
  model_config = validate_config(config)
  _check_workdir(workdir)
  _check_same_model(workdir, model_config)
  try:
    pipeline.ensure_dataset(config.data)
  except UserError as e:
    raise ConfigError(str(e)) from None
  is_main = jax.process_index() == 0
  if is_main:
    _check_writable(workdir)
  mesh = parallel.create_mesh(config.mesh)
  model = models.build_model(model_config)
  num_train = pipeline.num_examples(config.data, config.data.train_split)
  total_steps = optim.total_train_steps(config, num_train)
  schedule = optim.learning_rate_schedule(config, num_train, total_steps)
  tx = optim.create_optimizer(config, schedule)
  abstract_state, shardings = state_shardings(model, tx, mesh, config)
  logging.info("audiomaepp %s: %s params, mesh %s, %d train examples, %d steps of batch %d",
               audiomaepp.__version__, f"{optim.count_params(abstract_state.params):,}",
               dict(mesh.shape), num_train, total_steps, config.batch_size)

  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  checkpointer = _Checkpointer(workdir, config.keep_checkpoints)
  with_shardings = lambda abstract, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
  abstract_params, abstract_rest = abstract_state.checkpoint_items()
  params_sh, rest_sh = shardings.checkpoint_items()
  try:
    restored = checkpointing.restore_with_fallback(
        checkpointer.manager, with_shardings(abstract_params, params_sh),
        with_shardings(abstract_rest, rest_sh))
  except checkpointing.StructureMismatchError as e:
    raise _structure_error(workdir, config, e) from None
  except checkpointing.StorageError as e:
    raise TrainingError(str(e)) from None
  except RuntimeError as e:  # checkpoints exist, but none can be read
    raise TrainingError(str(e)) from None
  if is_main:  # only now that the run is accepted
    _record_config(workdir, config)
  if restored is None:
    state, start_step = init_train_state(model, tx, shardings, init_rng), 0
  else:
    state = step_lib.TrainState.from_checkpoint_items(restored.params, restored.train_state)
    start_step = restored.step
    logging.info("resumed from checkpoint step %d", start_step)

  rules = parallel.axis_rules(config)
  train_fn = compile_train_step(model, tx, schedule, config.grad_accum_steps, shardings, mesh,
                                rules)
  eval_fn = compile_eval_step(model, shardings.params, mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  block = pipeline.host_block(batch_sharding, config.batch_size)
  train_input = _train_input(config, start_step, block)
  eval_input = _EvalInput(config, block)
  rng = jax.device_put(train_rng, parallel.replicated(mesh))
  writer = metrics_lib.MetricsWriter(workdir, start_step, enabled=is_main)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_flops)
  throughput = metrics_lib.Throughput(
      global_batch=config.batch_size,
      flops_per_sample=models.train_flops_per_sample(model_config),
      peak_flops_total=peak * jax.device_count() if peak else None,
      total_steps=total_steps, start_step=start_step)
  watcher = _PreemptionWatcher(checkpointer.manager)
  profiler = profiling.StepProfiler(config.profile_steps, workdir)
  result = RunResult(step=start_step, checkpoint_step=checkpointer.latest_step())
  pending, window = [], []
  ending_error = None
  try:
    for step in range(start_step + 1, total_steps + 1):
      if on_step is not None:
        on_step(step)
      batch = pipeline.make_global_batch(next(train_input), batch_sharding)
      profiler.before(step)
      state, step_metrics = train_fn(state, batch, rng)
      profiler.after(step, step_metrics)
      pending.append(step_metrics)
      if step == start_step + 1:
        # Rates should not include compilation: time from the end of the first step.
        jax.block_until_ready(step_metrics)
        throughput.restart(step)
      result.step = step
      log_now = _due(step, config.log_every_steps, total_steps)
      save_now = _due(step, config.checkpoint_every_steps, total_steps)
      stop_now = watcher.requested(step)
      if log_now or save_now or stop_now:
        # The only host syncs: metrics are fetched at log and checkpoint steps.
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        _check_finite(fetched, step - len(fetched) + 1, checkpointer.latest_step())
        window.extend(fetched)
        pending = []
        result.final_loss = fetched[-1]["loss"]
      if log_now:
        writer.write_scalars(step, {**_summarise(window), **throughput.update(step)})
        window = []
      if save_now or stop_now:
        checkpointer.save(step, state)
      if not stop_now and config.eval_batches > 0 and _due(step, config.eval_every_steps,
                                                           total_steps):
        _evaluate(config, eval_fn, state.params, step, mesh, eval_input, workdir, writer)
        throughput.restart(step)
      if stop_now:
        result.preempted = True
        break
    error = checkpointer.wait()
    result.checkpoint_step = checkpointer.latest_step()
    if error and result.checkpoint_step != result.step:
      raise CheckpointError(error)
  except BaseException as e:
    ending_error = e
    raise
  finally:
    _close_all([profiler.close, train_input.close, eval_input.close, watcher.close,
                checkpointer.close, writer.close], ending_error)
    if is_main:
      _plot_loss_curve(workdir)
  if result.preempted:
    logging.warning("stopped by SIGTERM at step %d; checkpoint %s written, restart to resume",
                    result.step, result.checkpoint_step)
  else:
    logging.info("done: step %d, checkpoint %s", result.step, result.checkpoint_step)
  return result
