r"""Throughput, FLOPs, MFU and memory of the real pretraining step on synthetic device batches.

    python benchmarks/train_step.py --config=configs/base.py --batch_size=128,256 \
        [--dtype=bfloat16] [--config.model.attention_impl=cudnn] [--config.model.remat=full|dots] \
        [--steps=20] [--windows=3] [--warmup=3] [--peak_tflops=T] [--measure_peak] \
        [--breakdown_batch=N] [--max_batch] [--memory_gb=78] [--output=FILE]

The step is the trainer's own: `train.runner.state_shardings`, `initial_state` and
`compile_train_step` (explicit shardings, donated state) around `train.step.train_step`. Batches
of random log-mel crops are created on the device before timing; the clock stops only at the end
of each window of `--steps` steps (block_until_ready), as in the trainer, where the host never
waits for the device between log steps.

`--batch_size` is per device (a list sweeps several; the global batch is N x devices). For each:
compile time (lower + compile), step time (median window; the best too), samples/s, FLOPs per
sample (analytic: `models.train_flops_per_sample`; XLA: `cost_analysis()` of the compiled step,
which also counts elementwise ops and the optimiser, and not the insides of custom calls such as
cuDNN attention), achieved TFLOP/s per device and MFU against the peak of the device
(`metrics.PEAK_FLOPS`, or `--peak_tflops`, or a timed matmul with `--measure_peak`), and the
memory XLA plans for the step (`memory_analysis()`: arguments + temporaries + non-aliased outputs).

`--max_batch` reports the largest per-device batch that fits: an estimate from the planned memory
(linear in the batch, fitted over the compiled sizes) against the device's allocator limit (GPU,
TPU) or `--memory_gb` (CPU: an estimate for that budget), then, on accelerators only, measured by
running it, then one granule more at a time until one fails (stepping down if it fails).
`--breakdown_batch=N` also times, at that batch, the loss, value_and_grad and the AdamW update each
alone next to the full step (interleaved windows), so the optimiser's share is visible.
`--steps=0` only compiles (FLOPs and planned memory).
"""
import dataclasses
import math
import statistics
import time
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

import common
from audiomaepp import metrics
from audiomaepp import models
from audiomaepp import parallel
from audiomaepp.train import pretrain
from audiomaepp.train import runner
from audiomaepp.train import optim

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_BATCH_SIZE = flags.DEFINE_list("batch_size", ["8"], "Per-device batch size(s) to measure.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (overrides config.model.dtype).")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed window (0: compile only, for FLOPs "
                             "and memory).")
_WINDOWS = flags.DEFINE_integer("windows", 3, "Timed windows; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU "
                                  "(overrides metrics.PEAK_FLOPS).")
_MEASURE_PEAK = flags.DEFINE_bool("measure_peak", False, "Also time a square matmul in the "
                                  "compute dtype; it is the MFU reference where no peak is known.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 0, "Matmul size for --measure_peak "
                                    "(0: 8192 on accelerators, 2048 on CPU).")
_BREAKDOWN_BATCH = flags.DEFINE_integer("breakdown_batch", 0, "Also time the loss, "
                                        "value_and_grad and the optimiser update alone at this "
                                        "per-device batch (one of --batch_size; 0: off).")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Report the largest per-device batch that fits.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 78.0, "Device memory in GiB for the --max_batch "
                                "estimate where the device reports none (CPU; 78: an H100).")
_GRANULE = flags.DEFINE_integer("batch_granule", 64, "--max_batch rounds to multiples of this.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")

# AudioSet train clips of the MW-MAE config (docs/reference.md#data); only the learning-rate
# schedule uses it.
AUDIOSET_TRAIN_CLIPS = 2_051_308
GIB = 2 ** 30


@dataclasses.dataclass
class Bench:
  """The trainer's pieces for one config; `state` is replaced after every (donating) step."""
  config: ml_collections.ConfigDict
  task: pretrain.PretrainTask
  tx: Any
  schedule: Any
  mesh: Any
  shardings: Any
  state: Any
  rng: jax.Array

  @property
  def model(self) -> Any:
    return self.task.model

  @property
  def model_config(self) -> models.ModelConfig:
    return self.model.config

  def fresh_state_if_lost(self) -> None:
    """Re-creates the state when a failed (out-of-memory) step consumed its donated buffers."""
    if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
      self.state = runner.initial_state(self.task, self.tx, self.shardings,
                                        jax.random.PRNGKey(0))


def create_bench(config: ml_collections.ConfigDict) -> Bench:
  """Model, optimiser, mesh, sharded state and rng exactly as `train.runner.run` builds them."""
  task = pretrain.PretrainTask(config)
  total_steps = optim.total_train_steps(config, AUDIOSET_TRAIN_CLIPS)
  schedule = optim.learning_rate_schedule(config, AUDIOSET_TRAIN_CLIPS, total_steps)
  tx = optim.create_optimizer(config, schedule)
  mesh = parallel.create_mesh(config.mesh)
  _, shardings = runner.state_shardings(task, tx, mesh, parallel.axis_rules(config))
  state = runner.initial_state(task, tx, shardings, jax.random.PRNGKey(0))
  rng = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
  return Bench(config, task, tx, schedule, mesh, shardings, state, rng)


def device_batches(bench: Bench, global_batch: int, count: int = 2) -> list[dict[str, jax.Array]]:
  """`count` different random (global_batch, time, mel) batches created on the devices."""
  shape = (global_batch, *bench.model_config.input_shape)
  make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32),
                 out_shardings=parallel.batch_sharding(bench.mesh,
                                                       parallel.axis_rules(bench.config)))
  return [{"spectrogram": make(jax.random.PRNGKey(10 + i))} for i in range(count)]


def compile_step(bench: Bench, global_batch: int) -> tuple[Any, float]:
  """(compiled train step for `global_batch`, seconds to lower and compile it)."""
  placement = runner.Placement.create(bench.mesh, parallel.axis_rules(bench.config),
                                     bench.shardings, global_batch)
  train_fn = runner.compile_train_step(bench.task, bench.tx, bench.schedule, placement)
  batch = {"spectrogram": jax.ShapeDtypeStruct((global_batch, *bench.model_config.input_shape),
                                               jnp.float32)}
  start = time.perf_counter()
  compiled = train_fn.lower(bench.state, batch, bench.rng).compile()
  return compiled, time.perf_counter() - start


def xla_flops(compiled: Any) -> Optional[float]:
  """FLOPs of one execution of the compiled program (per device) from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def planned_bytes(compiled: Any) -> Optional[int]:
  """Device memory XLA plans for one execution: arguments + temporaries + non-aliased outputs."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.generated_code_size_in_bytes)


def is_out_of_memory(error: Exception) -> bool:
  """Whether an XLA error is an allocation failure (the batch does not fit)."""
  text = str(error).lower()
  return "resource_exhausted" in text or "out of memory" in text


def run_windows(step_fn: Any, state: Any, batches: list, rng: jax.Array, *, warmup: int,
                steps: int, windows: int) -> tuple[Any, list[float], float]:
  """Runs `warmup` steps, then `windows` timed windows of `steps` steps.

  Returns the last state, the seconds per step of each window and the last loss. The host waits
  for the device only at the end of the warm-up and of each window.
  """
  step_metrics = None
  for i in range(warmup):
    state, step_metrics = step_fn(state, batches[i % len(batches)], rng)
  jax.block_until_ready((state, step_metrics))
  per_step = []
  for _ in range(windows):
    start = time.perf_counter()
    for i in range(steps):
      state, step_metrics = step_fn(state, batches[i % len(batches)], rng)
    jax.block_until_ready((state, step_metrics))
    per_step.append((time.perf_counter() - start) / steps)
  loss = float(step_metrics["loss"]) if step_metrics is not None else float("nan")
  return state, per_step, loss


def resolve_peak(dtype: str) -> dict[str, Any]:
  """Per-device peak FLOP/s for MFU and where it came from; the measured matmul rate if asked."""
  kind = jax.devices()[0].device_kind
  peak = metrics.peak_flops_per_device(kind, _PEAK_TFLOPS.value * 1e12)
  if _PEAK_TFLOPS.value > 0:
    source = "--peak_tflops"
  elif peak:
    source = f"metrics.PEAK_FLOPS['{kind}'] (bf16 dense)"
  else:
    source = None
  measured = None
  if _MEASURE_PEAK.value:
    measured = common.matmul_flops(models.config.DTYPES[dtype], _MATMUL_SIZE.value)
    if not peak:
      peak, source = measured, f"measured {dtype} matmul"
  return {"peak_flops": peak, "source": source, "matmul_flops": measured,
          "matmul_size": (_MATMUL_SIZE.value or common.default_matmul_size())
          if _MEASURE_PEAK.value else None}


def measure(bench: Bench, per_device_batch: int, peak: dict[str, Any]) -> dict[str, Any]:
  """Compiles and times the step at one per-device batch; see the module docstring."""
  devices = jax.device_count()
  global_batch = per_device_batch * devices
  compiled, compile_s = compile_step(bench, global_batch)
  analytic = models.train_flops_per_sample(bench.model_config)
  program_flops = xla_flops(compiled)
  xla_per_sample = program_flops * devices / global_batch if program_flops else None
  result = {
      "per_device_batch": per_device_batch, "global_batch": global_batch,
      "compile_s": compile_s, "analytic_flops_per_sample": analytic,
      "xla_flops_per_sample": xla_per_sample,
      "xla_over_analytic": xla_per_sample / analytic if xla_per_sample else None,
      "planned_bytes": planned_bytes(compiled),
  }
  if _STEPS.value == 0:  # compile only: FLOPs and memory
    return result
  batches = device_batches(bench, global_batch)
  bench.state, per_step, loss = run_windows(
      compiled, bench.state, batches, bench.rng, warmup=_WARMUP.value, steps=_STEPS.value,
      windows=_WINDOWS.value)
  step_s = statistics.median(per_step)
  samples_per_s = global_batch / step_s
  achieved = samples_per_s * analytic / devices
  result.update({
      "step_s": step_s, "step_s_best": min(per_step), "step_s_windows": per_step,
      "samples_per_s": samples_per_s, "achieved_flops_per_device": achieved,
      "mfu": achieved / peak["peak_flops"] if peak["peak_flops"] else None,
      "mfu_vs_matmul": achieved / peak["matmul_flops"] if peak["matmul_flops"] else None,
      "last_loss": loss, "loss_finite": math.isfinite(loss),
  })
  logging.info("batch %d/device: %.1f samples/s, compile %.1f s", per_device_batch,
               samples_per_s, compile_s)
  return result


def breakdown(bench: Bench, per_device_batch: int) -> dict[str, float]:
  """Seconds per step of the full train step and of its parts alone at one per-device batch.

  Parts: the loss (forward), value_and_grad (forward and backward, gradients written out) and the
  AdamW update with its parameter update (on fixed gradients). They are timed in interleaved
  windows so that a change in the load of a shared machine affects all of them alike.
  """
  global_batch = per_device_batch * jax.device_count()
  batches = device_batches(bench, global_batch)
  train_fn, _ = compile_step(bench, global_batch)
  model, tx = bench.model, bench.tx

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["spectrogram"], rngs={"masking": rng})
    return out["loss"].astype(jnp.float32)

  def without_state(fn):
    # The params stand in for the state: the same arguments every step, nothing donated.
    jitted = jax.jit(fn)
    return lambda params, batch, rng: (params, _as_metrics(jitted(params, batch, rng)))

  def optimiser_update(state, grads, rng):
    del rng
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), {"loss": jnp.zeros(())}

  grads = [jax.tree.map(lambda p: jnp.full_like(p, 1e-3), bench.state.params)]
  # name: (step function, its inputs, whether it carries (and donates) the train state)
  parts = {"step_s": (train_fn, batches, True),
           "loss_s": (without_state(loss_fn), batches, False),
           "loss_and_grad_s": (without_state(jax.value_and_grad(loss_fn)), batches, False),
           "optimiser_s": (jax.jit(optimiser_update, donate_argnums=0), grads, True)}
  per_step = {name: [] for name in parts}
  for window in range(_WINDOWS.value + 1):  # the first round is the warm-up (and compiles)
    for name, (fn, inputs, carries_state) in parts.items():
      carried = bench.state if carries_state else bench.state.params
      carried, seconds, _ = run_windows(fn, carried, inputs, bench.rng, warmup=0,
                                        steps=_STEPS.value if window else max(1, _WARMUP.value),
                                        windows=1)
      if carries_state:
        bench.state = carried
      if window:
        per_step[name].extend(seconds)
  return {name: statistics.median(seconds) for name, seconds in per_step.items()}


def _as_metrics(out: Any) -> dict[str, jax.Array]:
  """The loss of a loss or (loss, grads) output, keeping the grads alive until the wait."""
  if isinstance(out, tuple):
    return {"loss": out[0], "grads": out[1]}
  return {"loss": out}


def linear_memory_model(points: dict[int, int]) -> tuple[float, float]:
  """(fixed bytes, bytes per sample) of planned memory over per-device batch sizes."""
  sizes = sorted(points)
  slope, intercept = np.polyfit(sizes, [points[b] for b in sizes], 1)
  return float(intercept), float(slope)


def memory_budget() -> tuple[int, str]:
  """(bytes one device may use, where that number came from)."""
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device allocator bytes_limit"
  return int(_MEMORY_GB.value * GIB), f"--memory_gb={_MEMORY_GB.value:g}"


def fits(bench: Bench, per_device_batch: int) -> bool:
  """Whether two steps at this per-device batch compile and run without running out of memory."""
  global_batch = per_device_batch * jax.device_count()
  try:
    compiled, _ = compile_step(bench, global_batch)
    batches = device_batches(bench, global_batch, count=1)
    bench.state, _, _ = run_windows(compiled, bench.state, batches, bench.rng, warmup=1,
                                    steps=1, windows=1)
    return True
  except Exception as error:  # pylint: disable=broad-except
    if not is_out_of_memory(error):
      raise
    logging.info("batch %d per device: out of memory", per_device_batch)
    bench.fresh_state_if_lost()
    return False


def max_batch(bench: Bench, planned: dict[int, int]) -> dict[str, Any]:
  """The largest per-device batch: estimated from planned memory, measured on accelerators."""
  granule = _GRANULE.value
  if len(planned) < 2:
    extra = 2 * max(planned) if planned else granule
    compiled, _ = compile_step(bench, extra * jax.device_count())
    planned = {**planned, extra: planned_bytes(compiled)}
  fixed, per_sample = linear_memory_model(planned)
  budget, budget_source = memory_budget()
  estimate = max(0, int((budget - fixed) / per_sample) // granule * granule)
  result = {"estimate": estimate, "estimate_method": "XLA memory_analysis, linear fit over "
            f"batches {sorted(planned)}", "budget_bytes": budget, "budget_source": budget_source,
            "fixed_bytes": fixed, "bytes_per_sample": per_sample,
            "measured": None, "first_failing": None}
  if jax.devices()[0].platform == "cpu" or estimate == 0:
    return result
  # Accelerators: run the estimate, one granule above it, and step down while it fails.
  candidate, largest_fit, first_fail = estimate, None, None
  for _ in range(6):
    if fits(bench, candidate):
      largest_fit = candidate
      if first_fail is not None:
        break
      candidate += granule
    else:
      first_fail = candidate
      if largest_fit is not None:
        break
      candidate = max(granule, candidate - granule * max(1, estimate // (10 * granule)))
  result.update(measured=largest_fit, first_failing=first_fail)
  return result


def _model_record(bench: Bench) -> dict[str, Any]:
  c = bench.model_config
  return {"size": c.size, "width": c.width, "depth": c.depth, "decoder_width": c.decoder_width,
          "decoder_depth": c.decoder_depth, "dtype": c.dtype, "attention_impl": c.attention_impl,
          "remat": c.remat, "params": optim.count_params(bench.state.params),
          "encoder_tokens": c.num_keep + 1, "decoder_tokens": c.num_patches + 1}


COLUMNS = (
    ("per_device_batch", "batch/device", "d"),
    ("compile_s", "compile s", ".1f"),
    ("step_s", "step ms", lambda s: f"{1e3 * s:.1f}"),
    ("samples_per_s", "samples/s", common.rate),
    ("analytic_flops_per_sample", "GFLOP/sample", lambda f: f"{f / 1e9:.2f}"),
    ("xla_flops_per_sample", "XLA GFLOP/sample", lambda f: f"{f / 1e9:.2f}"),
    ("xla_over_analytic", "XLA/analytic", ".3f"),
    ("achieved_flops_per_device", "TFLOP/s/device", lambda f: f"{f / 1e12:.3f}"),
    ("mfu", "MFU", ".1%"),
    ("planned_bytes", "planned GiB", lambda b: f"{b / GIB:.2f}"),
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  try:
    batch_sizes = sorted({int(b) for b in _BATCH_SIZE.value})
  except ValueError:
    raise app.UsageError(f"--batch_size={','.join(_BATCH_SIZE.value)}: expected integers")
  if not batch_sizes or batch_sizes[0] <= 0:
    raise app.UsageError("--batch_size: expected positive per-device batch sizes")
  if _BREAKDOWN_BATCH.value and _BREAKDOWN_BATCH.value not in batch_sizes:
    raise app.UsageError(f"--breakdown_batch={_BREAKDOWN_BATCH.value} is not in --batch_size")
  if _STEPS.value < 0 or _WINDOWS.value <= 0 or _WARMUP.value < 0:
    raise app.UsageError("--steps and --warmup must be >= 0 and --windows > 0")
  config = _CONFIG.value
  with config.unlocked():
    if _DTYPE.value:
      config.model.dtype = _DTYPE.value
    config.batch_size = batch_sizes[0] * jax.device_count()
  env = common.environment()
  bench = create_bench(config)
  peak = resolve_peak(bench.model_config.dtype)
  results, planned = [], {}
  for per_device_batch in batch_sizes:
    try:
      result = measure(bench, per_device_batch, peak)
    except Exception as error:  # pylint: disable=broad-except
      if not is_out_of_memory(error):
        raise
      bench.fresh_state_if_lost()
      result = {"per_device_batch": per_device_batch, "error": "out of memory"}
    results.append(result)
    if result.get("planned_bytes"):
      planned[per_device_batch] = result["planned_bytes"]
  record = {"benchmark": "train_step", "environment": env,
            "config": config_flags.get_config_filename(flags.FLAGS["config"]),
            "model": _model_record(bench), "peak": peak, "results": results,
            "steps_per_window": _STEPS.value, "windows": _WINDOWS.value, "warmup": _WARMUP.value}
  if _BREAKDOWN_BATCH.value:
    full = next(r for r in results if r["per_device_batch"] == _BREAKDOWN_BATCH.value)
    if "step_s" in full:
      record["breakdown"] = {"per_device_batch": full["per_device_batch"],
                             **breakdown(bench, full["per_device_batch"])}
  if _MAX_BATCH.value:
    record["max_batch"] = max_batch(bench, planned)
  print(report(record))
  common.write_json(_OUTPUT.value, record)


def report(record: dict[str, Any]) -> str:
  """The printed summary of a `train_step` record: header, table, breakdown, largest batch."""
  m, env, peak = record["model"], record["environment"], record["peak"]
  lines = [f"train step: {record['config']} ({m['params']:,} params, {m['dtype']}, attention "
           f"{m['attention_impl'] or 'xla'}, remat {m['remat']})",
           common.describe(env),
           f"peak for MFU: {_format_peak(peak)}; measured matmul: "
           f"{_format_flops(peak['matmul_flops'])}",
           common.table(record["results"], COLUMNS)]
  if "breakdown" in record:
    b = record["breakdown"]
    lines.append(
        f"breakdown at batch {b['per_device_batch']}/device (each part alone): full step "
        f"{1e3 * b['step_s']:.1f} ms, loss {1e3 * b['loss_s']:.1f} ms, loss+grad "
        f"{1e3 * b['loss_and_grad_s']:.1f} ms, AdamW update {1e3 * b['optimiser_s']:.1f} ms "
        f"({b['optimiser_s'] / b['step_s']:.1%} of the step)")
  if "max_batch" in record:
    mb = record["max_batch"]
    if env["platform"] == "cpu":
      measured = "not measured on CPU"
    else:
      measured = f"measured {mb['measured']}" if mb["measured"] else "measured: none fit"
      if mb["first_failing"]:
        measured += f", first failing {mb['first_failing']}"
    lines.append(
        f"largest per-device batch: estimate {mb['estimate']} ({mb['estimate_method']}; "
        f"{mb['fixed_bytes'] / GIB:.2f} GiB + {mb['bytes_per_sample'] / 2 ** 20:.2f} MiB/sample "
        f"vs {mb['budget_bytes'] / GIB:.1f} GiB from {mb['budget_source']}); {measured}")
  return "\n".join(lines)


def _format_flops(flops: Optional[float]) -> str:
  return f"{flops / 1e12:.3f} TFLOP/s" if flops else "unknown"


def _format_peak(peak: dict[str, Any]) -> str:
  if not peak["peak_flops"]:
    return "unknown (pass --peak_tflops or --measure_peak)"
  return f"{_format_flops(peak['peak_flops'])} per device ({peak['source']})"


if __name__ == "__main__":
  app.run(main)
