"""The pretraining loop: validate the config, build the sharded state, train, log, checkpoint.

`run(config, workdir)` is what `main.py` calls. I/O, clocks and signals live here; the steps in
`step.py` are pure. Reliability guarantees (see docs/reliability.md):
  * resume: a run restarted on the same workdir continues from the newest intact checkpoint, with
    the same data order (Grain iterator state) and masks (fold_in(seed key, step)), so losses are
    bit-identical to an uninterrupted run on CPU;
  * SIGTERM: the run checkpoints the current step and stops (`RunResult.preempted`);
  * a non-finite loss or gradient norm stops the run before it is checkpointed, so the latest
    checkpoint stays the last good one;
  * a failed checkpoint write (disk full, ...) is reported and its partial files removed; the
    previous checkpoint stays restorable;
  * resuming with another `data.num_workers` (on which the saved iterator state depends) is
    refused before anything is restored.
"""
import dataclasses
import functools
import json
import math
import os
import re
import signal
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

import audiomaepp
from audiomaepp import checkpointing
from audiomaepp import metrics as metrics_lib
from audiomaepp import models
from audiomaepp import parallel
from audiomaepp import visualize
from audiomaepp.data import pipeline
from audiomaepp.train import optim
from audiomaepp.train import step as step_lib

RECONSTRUCTION_DIR = "reconstructions"
LOSS_CURVE_FILE = "loss_curve.png"
# Eval masks come from this fixed stream (folded with the batch index), the same at every eval.
EVAL_MASK_STREAM = 0x5EED


class TrainingError(Exception):
  """A run that cannot start or continue; the message is one line for the user."""


class ConfigError(TrainingError, ValueError):
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
  try:
    model_config = models.resolve_model_config(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  num_devices, num_processes = jax.device_count(), jax.process_count()
  for name in ("batch_size", "grad_accum_steps", "log_every_steps", "checkpoint_every_steps",
               "eval_every_steps", "keep_checkpoints"):
    if int(config[name]) <= 0:
      raise ConfigError(f"config.{name}={config[name]}: expected a positive integer")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("config.num_train_steps and config.num_epochs are both <= 0: set one")
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
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_data(config.data)
  return model_config


def _check_data(data_config: ml_collections.ConfigDict) -> None:
  """The dataset must exist (TFDS shards), or is built now (the synthetic corpus)."""
  try:
    pipeline.dataset_path(data_config)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir with checkpoints resumes only with the block layout (`model.scan_layers`) and the
  Grain worker count they were saved with: the parameter tree and the iterator state depend on
  them (restoring otherwise fails, and would read as damage)."""
  checkpoint_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  steps = ([n for n in os.listdir(checkpoint_dir) if n.isdigit()]
           if os.path.isdir(checkpoint_dir) else [])
  if not steps or not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    return
  recorded_config = checkpointing.load_config(workdir)
  scanned = models.resolve_model_config(recorded_config.model).scan_layers
  if scanned != models.resolve_model_config(config.model).scan_layers:
    raise ConfigError(
        f"the checkpoints in {workdir} hold {'stacked' if scanned else 'per-block'} layers: "
        f"resume with --config.model.scan_layers={scanned}, or use a new workdir")
  recorded = recorded_config.data.num_workers
  if recorded != config.data.num_workers:
    raise ConfigError(
        f"config.data.num_workers={config.data.num_workers} differs from {recorded}, the value "
        f"the checkpoints in {workdir} were saved with (the data iterator state depends on it): "
        f"resume with --config.data.num_workers={recorded}, or use a new workdir")


def _record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, warning about fields that differ from the config of an earlier run."""
  if os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
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
    self._pending: Optional[int] = None

  def wait(self) -> Optional[str]:
    """Waits for the save in flight; returns an error message if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    return None

  def save(self, step: int, state: step_lib.TrainState, data_iter: Any) -> Optional[str]:
    """Starts saving `state` as `step` after the previous save finished; returns an error."""
    error = self.wait()
    params, rest = state.checkpoint_items()
    try:
      checkpointing.save_train_state(self.manager, step, params, rest, data_iter)
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    self._pending = step
    return error

  def _failed(self, step: Optional[int], error: BaseException) -> str:
    """Removes what the failed save of `step` wrote; logs and returns the report."""
    if step is not None:
      checkpointing.discard_failed_save(self.manager, step)
    message = (f"checkpoint save at step {step} failed ({describe_error(error)}); "
               f"latest complete checkpoint: {self.latest_step()}")
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


def _local_batch(iterator: Any, step: int, config: ml_collections.ConfigDict) -> dict:
  """The next host-local batch; `inject_nan_at_step` (fault-injection tests) poisons one."""
  batch = next(iterator)
  spectrogram = np.asarray(batch["spectrogram"], np.float32)
  if step == config.inject_nan_at_step:
    spectrogram = np.full_like(spectrogram, np.nan)
  return {"spectrogram": spectrogram}


def _evaluate(config: ml_collections.ConfigDict, eval_fn: Any, params: Any, step: int,
              mesh: jax.sharding.Mesh, workdir: str, writer: metrics_lib.MetricsWriter) -> float:
  """Validation loss over `eval_batches` held-out batches (fixed masks) and a reconstruction PNG.

  The eval iterator repeats its split, so every host runs the same number of full batches.
  """
  iterator = pipeline.create_iterator(
      config.data, split=config.data.eval_split,
      batch_size=config.batch_size // jax.process_count(), seed=config.seed, train=False,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  sharding = parallel.batch_sharding(mesh, parallel.axis_rules(config))
  mask_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_MASK_STREAM)
  losses, first = [], None
  for index, batch in zip(range(config.eval_batches), iterator):
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


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Pretrains (or resumes) `config` in `workdir`; see the module docstring for guarantees."""
  model_config = validate_config(config)
  _check_resumable(workdir, config)
  is_main = jax.process_index() == 0
  if is_main:
    _record_config(workdir, config)
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
  per_host_batch = config.batch_size // jax.process_count()
  train_iter = pipeline.create_iterator(
      config.data, split=config.data.train_split, batch_size=per_host_batch, seed=config.seed,
      train=True, shard_index=jax.process_index(), shard_count=jax.process_count())
  checkpointer = _Checkpointer(workdir, config.keep_checkpoints)
  with_shardings = lambda abstract, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
  abstract_params, abstract_rest = abstract_state.checkpoint_items()
  params_sh, rest_sh = shardings.checkpoint_items()
  try:
    restored = checkpointing.restore_with_fallback(
        checkpointer.manager, with_shardings(abstract_params, params_sh),
        with_shardings(abstract_rest, rest_sh), train_iter)
  except RuntimeError as e:  # checkpoints exist, but none can be read
    raise TrainingError(str(e)) from None
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
  rng = jax.device_put(train_rng, parallel.replicated(mesh))
  writer = metrics_lib.MetricsWriter(workdir, start_step, enabled=is_main)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_flops)
  throughput = metrics_lib.Throughput(
      global_batch=config.batch_size,
      flops_per_sample=models.train_flops_per_sample(model_config),
      peak_flops_total=peak * jax.device_count() if peak else None,
      total_steps=total_steps, start_step=start_step)
  watcher = _PreemptionWatcher(checkpointer.manager)
  result = RunResult(step=start_step, checkpoint_step=checkpointer.latest_step())
  pending, window = [], []
  try:
    for step in range(start_step + 1, total_steps + 1):
      local = _local_batch(train_iter, step, config)
      batch = pipeline.make_global_batch(local, batch_sharding)
      state, step_metrics = train_fn(state, batch, rng)
      pending.append(step_metrics)
      if step == start_step + 1:
        # Rates should not include compilation: time from the end of the first step.
        jax.block_until_ready(step_metrics)
        throughput.restart(step)
      result.step = step
      log_now = step % config.log_every_steps == 0 or step == total_steps
      save_now = step % config.checkpoint_every_steps == 0 or step == total_steps
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
        checkpointer.save(step, state, train_iter)
      if not stop_now and config.eval_batches > 0 and (step % config.eval_every_steps == 0
                                                       or step == total_steps):
        _evaluate(config, eval_fn, state.params, step, mesh, workdir, writer)
        throughput.restart(step)
      if stop_now:
        result.preempted = True
        break
    error = checkpointer.wait()
    result.checkpoint_step = checkpointer.latest_step()
    if error and result.checkpoint_step != result.step:
      raise CheckpointError(error)
  finally:
    watcher.close()
    checkpointer.close()
    writer.close()
    if is_main:
      visualize.plot_loss_curve_from_workdir(workdir, os.path.join(workdir, LOSS_CURVE_FILE))
  if result.preempted:
    logging.warning("stopped by SIGTERM at step %d; checkpoint %s written, restart to resume",
                    result.step, result.checkpoint_step)
  else:
    logging.info("done: step %d, checkpoint %s", result.step, result.checkpoint_step)
  return result
