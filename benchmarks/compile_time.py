r"""Compile time of the trainer's step: scanned vs unrolled blocks, full depth vs 2 + 1 blocks.

    python benchmarks/compile_time.py --config=configs/base.py [--batch_size=2] [--repeats=2] \
        [--output=FILE]

For each layout (`model.scan_layers` True / False) and depth (the config's, and 2 encoder + 1
decoder blocks of the same widths), lowers and compiles `train.runner.compile_train_step` on
abstract inputs (nothing is initialised or run), `--repeats` times in interleaved order. Each
compile is timed in wall seconds and in this process's CPU seconds (`time.process_time`: XLA
compiles on few threads, and CPU time is far less disturbed by other jobs on a shared machine);
the fastest of each is reported, with the CPU-time ratio to the 2 + 1 model of the same layout.
The target for scanned layers is a ratio <= 1.5 (compile time independent of depth).
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import common
from audiomaepp import models
from audiomaepp import parallel
from audiomaepp.train import pretrain
from audiomaepp.train import runner
from audiomaepp.train import optim

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Per-device batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Compiles of each variant (interleaved).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")

STEPS_FOR_SCHEDULE = 10_000


def compile_seconds(config, layers: bool, shallow: bool) -> tuple[float, float]:
  """(wall, CPU) seconds to lower and compile the train step of `config` in one variant."""
  config = config.copy_and_resolve_references()
  config.model.scan_layers = layers
  if shallow:
    resolved = models.resolve_model_config(config.model)
    config.model.size, config.model.width, config.model.num_heads = (
        None, resolved.width, resolved.num_heads)
    config.model.depth, config.model.decoder_depth = 2, 1
  task = pretrain.PretrainTask(config)
  schedule = optim.learning_rate_schedule(config, STEPS_FOR_SCHEDULE, STEPS_FOR_SCHEDULE)
  tx = optim.create_optimizer(config, schedule)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.axis_rules(config)
  abstract_state, shardings = runner.state_shardings(task, tx, mesh, rules)
  global_batch = _BATCH_SIZE.value * jax.device_count()
  train_fn = runner.compile_train_step(
      task, tx, schedule, runner.Placement.create(mesh, rules, shardings, global_batch))
  batch = {"spectrogram": jax.ShapeDtypeStruct((global_batch, *task.model.config.input_shape),
                                               jnp.float32)}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  start, start_cpu = time.perf_counter(), time.process_time()
  train_fn.lower(abstract_state, batch, rng).compile()
  return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  config = _CONFIG.value
  config.batch_size = _BATCH_SIZE.value * jax.device_count()
  variants = [(layers, shallow) for layers in (True, False) for shallow in (False, True)]
  times = {v: [] for v in variants}
  for _ in range(_REPEATS.value):
    for variant in variants:
      times[variant].append(compile_seconds(config, *variant))
  c = models.resolve_model_config(config.model)
  rows = []
  for layers, shallow in variants:
    wall, cpu = (min(t[i] for t in times[(layers, shallow)]) for i in (0, 1))
    rows.append({"layout": "scanned" if layers else "unrolled",
                 "blocks": "2 + 1" if shallow else f"{c.depth} + {c.decoder_depth}",
                 "compile_s": wall, "compile_cpu_s": cpu, "all_s": times[(layers, shallow)],
                 "vs_2_plus_1": cpu / min(t[1] for t in times[(layers, True)])})
  print(common.describe(common.environment()))
  print(common.table(rows, (("layout", "layout", "s"), ("blocks", "blocks", "s"),
                            ("compile_s", "compile wall s", ".1f"),
                            ("compile_cpu_s", "compile CPU s", ".1f"),
                            ("vs_2_plus_1", "CPU s / 2 + 1", ".2f"))))
  common.write_json(_OUTPUT.value, {"benchmark": "compile_time", "environment":
                                    common.environment(), "batch_size": _BATCH_SIZE.value,
                                    "rows": rows})


if __name__ == "__main__":
  app.run(main)
