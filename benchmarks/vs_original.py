r"""The project vs the original PyTorch AudioMAE++ on this machine, side by side in one process.

    python benchmarks/vs_original.py [--rows=tiny_train,tiny_encode,base_encode] \
        [--batch_size=32] [--rounds=3] [--threads=N] [--original=../shared/original] \
        [--output=FILE]

Rows (float32, batch 32 by default): the Tiny train step (mask ratio 0.8, AdamW: the original's
forward, `mae_loss`, backward and `AdamW.step`; the project's `train.runner.compile_train_step`
with donated state), the Tiny encoder forward on all 250 tokens (`forward_features` under
`no_grad`; `MaskedAutoencoder.encode` jitted) and the Base encoder forward. Both run with every
core (`torch.set_num_threads(os.cpu_count())`; XLA:CPU's own pool), or with `--threads=1` both
on one thread (less disturbed by other jobs on a shared machine). Timing is interleaved: each
round times one call of the original and one of the project back to back, so a busy shared
machine slows both alike; rates are the median over rounds, and the ratio is the median of the
per-round ratios. Needs PyTorch and the original's code (`../shared/original`, MIT licence, not
part of the project); without them it prints why and exits 0.
"""
import importlib.util
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax

import common
from audiomaepp import experiment
from audiomaepp import parallel
from audiomaepp.train import pretrain
from audiomaepp.train import runner
from audiomaepp.train import optim

ROWS = ("tiny_train", "tiny_encode", "base_encode")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to measure, of {ROWS}.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size of every row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per row (after one warm-up call).")
_ORIGINAL = flags.DEFINE_string("original", os.path.join(REPO, "..", "shared", "original"),
                                "Directory holding the original's package audiomaepp_original.")
_THREADS = flags.DEFINE_integer("threads", 0, "1: both on one thread (torch.set_num_threads(1), "
                                "XLA without its Eigen thread pool); 0: every core.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

STEPS_FOR_SCHEDULE = 10_000
ORIGINAL_DECODER = dict(decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=8,
                        encoder_plusplus_block=True, decoder_plusplus_block=True,
                        encoder_use_swiglu_final_ffn=True, decoder_use_swiglu_final_ffn=True)


def missing_requirement() -> str:
  """Why the comparison cannot run here ('' when it can)."""
  if not os.path.isdir(os.path.join(_ORIGINAL.value, "audiomaepp_original")):
    return f"the original's code is not at {_ORIGINAL.value} (--original=DIR)"
  if importlib.util.find_spec("torch") is None:
    return "PyTorch is not installed (pip install torch einops rotary-embedding-torch)"
  return ""


def original_calls(size: str, batch: int) -> dict:
  """The original's train step and forward_features of `size` as zero-argument callables."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(_ORIGINAL.value))
  from audiomaepp_original import models as original_models  # pylint: disable=g-import-not-at-top
  from audiomaepp_original.loss import mae_loss  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1 if _THREADS.value == 1 else os.cpu_count())
  torch.manual_seed(0)
  model = getattr(original_models, f"mae_plusplus_{size}")(**ORIGINAL_DECODER)
  optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                weight_decay=0.05)
  x = torch.randn(batch, 1, 200, 80)

  def train():
    model.train()
    pred, target, mask = model(x)
    loss = mae_loss(pred, target, mask)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()

  def encode():
    model.eval()
    with torch.no_grad():
      model.forward_features(x)

  return {"train": train, "encode": encode}


def project_calls(size: str, batch: int) -> dict:
  """The project's jitted train step (as the trainer builds it) and encode, compiled."""
  config = experiment.load_config(os.path.join(REPO, "configs", f"{size}.py"))
  config.batch_size = batch
  task = pretrain.PretrainTask(config)
  model = task.model
  schedule = optim.learning_rate_schedule(config, STEPS_FOR_SCHEDULE, STEPS_FOR_SCHEDULE)
  tx = optim.create_optimizer(config, schedule)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.axis_rules(config)
  _, shardings = runner.state_shardings(task, tx, mesh, rules)
  holder = {"state": runner.initial_state(task, tx, shardings, jax.random.PRNGKey(0))}
  step = runner.compile_train_step(task, tx, schedule,
                                   runner.Placement.create(mesh, rules, shardings, batch))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch, *model.config.input_shape)),
                     parallel.batch_sharding(mesh, rules))
  rng = jax.random.PRNGKey(2)
  encode_fn = jax.jit(lambda params, x: model.apply({"params": params}, x,
                                                    method=model.encode)["frames"])

  def train():
    holder["state"], metrics = step(holder["state"], {"spectrogram": x}, rng)
    jax.block_until_ready(metrics)

  def encode():
    jax.block_until_ready(encode_fn(holder["state"].params, x))

  return {"train": train, "encode": encode}


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure_row(row: str, batch: int, rounds: int, calls: dict) -> dict:
  """Interleaved timing of one row; rates in samples (chunks) per second."""
  size, work = row.split("_")
  original, project = calls["original", size][work], calls["project", size][work]
  original(), project()  # warm-up (compiles the project's functions)
  times = [(_seconds(original), _seconds(project)) for _ in range(rounds)]
  original_s = statistics.median(t[0] for t in times)
  project_s = statistics.median(t[1] for t in times)
  return {"row": row, "batch": batch, "original_per_s": batch / original_s,
          "project_per_s": batch / project_s,
          "ratio": statistics.median(o / p for o, p in times), "times_s": times}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  unknown = sorted(set(_ROWS.value) - set(ROWS))
  if unknown:
    raise app.UsageError(f"--rows: unknown {unknown}; expected some of {ROWS}")
  if _THREADS.value not in (0, 1):
    raise app.UsageError("--threads: expected 0 (every core) or 1")
  reason = missing_requirement()
  if reason:
    print(f"vs_original: skipped: {reason}")
    return
  if _THREADS.value == 1:  # read when JAX starts its CPU backend, i.e. below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}"
  env = common.environment()
  batch = _BATCH_SIZE.value
  calls, results = {}, []
  for row in _ROWS.value:
    size = row.split("_")[0]
    if ("project", size) not in calls:
      calls["original", size] = original_calls(size, batch)
      calls["project", size] = project_calls(size, batch)
    results.append(measure_row(row, batch, _ROUNDS.value, calls))
    print(f"{row}: original {results[-1]['original_per_s']:.2f}/s, project "
          f"{results[-1]['project_per_s']:.2f}/s, ratio {results[-1]['ratio']:.2f}", flush=True)
  print(common.describe(env))
  print(common.table(results, (("row", "work", "s"), ("batch", "batch", "d"),
                               ("original_per_s", "original /s", ".2f"),
                               ("project_per_s", "project /s", ".2f"),
                               ("ratio", "project / original", ".2f"))))
  common.write_json(_OUTPUT.value, {"benchmark": "vs_original", "environment": env,
                                    "threads": _THREADS.value or os.cpu_count(),
                                    "rounds": _ROUNDS.value, "results": results})


if __name__ == "__main__":
  app.run(main)
