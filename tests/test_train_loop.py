"""The training program end to end on the shrunk demo config (subprocesses of main.py).

One uninterrupted reference run, then: kill -9 mid-run -> resume -> SIGTERM -> resume to the end,
whose losses must equal the reference bit for bit; and a NaN injected into one batch. All runs
share a persistent compilation cache, so only the first compiles.
"""
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from audiomaepp import checkpointing
from audiomaepp import metrics
from audiomaepp.data import pipeline
from audiomaepp.train import pretrain
from conftest import experiment_config
import faults
import main_runs

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
# The demo config shrunk to seconds: same code paths, tiny model and batch.
SHRUNK = main_runs.shrunk_demo(STEPS, checkpoint_every=2, eval_every=STEPS)
PREEMPTED = 143


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return main_runs.fast_env(tmp_path_factory.mktemp("jax_cache"))


def _start(workdir, env, *extra, program=(sys.executable, "main.py")):
  # A new session: the whole process group (with any Grain workers) can be killed at once.
  return subprocess.Popen([*program, *SHRUNK, f"--workdir={workdir}", *extra],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)


def _finish(proc, timeout=300):
  try:
    output, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  return proc.returncode, output


def _train_losses(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _signal_at_step(proc, workdir, step, signum):
  """Sends `signum` to the process group once `step` is logged (by any run in `workdir`)."""
  deadline = time.time() + 300
  while max(_train_losses(workdir), default=0) < step:
    if proc.poll() is not None or time.time() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail(f"run ended or stalled before step {step}:\n{proc.communicate()[0][-3000:]}")
    time.sleep(0.02)
  os.killpg(proc.pid, signum)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  workdir = str(tmp_path_factory.mktemp("reference"))
  code, output = _finish(_start(workdir, env))
  assert code == 0, output[-3000:]
  return workdir


def test_reference_run_writes_the_experiment_record(reference):
  records = metrics.read_jsonl(os.path.join(reference, metrics.METRICS_FILE))
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for r in train:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] >= 0
  assert train[0]["lr"] == 0.0 and train[-1]["lr"] > 0  # linear warm-up from 0
  assert all(r["samples_per_sec"] > 0 and r["eta_s"] >= 0 for r in train[1:])
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [STEPS] and np.isfinite(evals[0]["loss"])

  config = checkpointing.load_config(reference)
  assert config.num_train_steps == STEPS and config.model.width == 64  # overrides recorded
  with open(os.path.join(reference, checkpointing.CONFIG_FILE)) as f:
    assert json.load(f)["_audiomaepp_version"]
  steps = sorted(int(s) for s in os.listdir(os.path.join(reference, "checkpoints")))
  assert steps == [STEPS - 2, STEPS]  # keep_checkpoints=2
  items = set(os.listdir(os.path.join(reference, "checkpoints", str(STEPS))))
  # No data iterator state: the step says where the data continues.
  assert {"params", "train_state"} <= items and "data_iter" not in items
  assert os.path.getsize(os.path.join(reference, "reconstructions",
                                      f"step_{STEPS:08d}.png")) > 10_000
  assert os.path.getsize(os.path.join(reference, "loss_curve.png")) > 10_000
  assert any(n.startswith("events.out.tfevents")
             for n in os.listdir(os.path.join(reference, metrics.TENSORBOARD_DIR)))


def test_kill9_then_sigterm_then_resume_gives_identical_losses(reference, env, tmp_path):
  workdir = str(tmp_path)
  # 1. kill -9 (no chance to clean up) after step 5 is logged, wherever the run then is.
  proc = _start(workdir, env)
  _signal_at_step(proc, workdir, 5, signal.SIGKILL)
  code, _ = _finish(proc)
  assert code == -signal.SIGKILL
  killed_at = max(_train_losses(workdir))
  assert killed_at < STEPS

  # 2. Resume, then a preemption notice (SIGTERM) after step 9: checkpoint and exit 143.
  proc = _start(workdir, env)
  _signal_at_step(proc, workdir, 9, signal.SIGTERM)
  code, output = _finish(proc)
  assert code == PREEMPTED, output[-3000:]
  resumed_from = int(output.split("resumed from checkpoint step ")[1].split()[0])
  assert resumed_from <= killed_at and resumed_from % 2 == 0
  stopped_at = max(_train_losses(workdir))
  assert stopped_at < STEPS
  assert str(stopped_at) in os.listdir(os.path.join(workdir, "checkpoints"))

  # 3. Resume to the end: from the SIGTERM checkpoint, with the reference's losses.
  code, output = _finish(_start(workdir, env))
  assert code == 0, output[-3000:]
  assert f"resumed from checkpoint step {stopped_at}" in output
  assert _train_losses(workdir) == _train_losses(reference)  # bit-identical floats


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference, env, tmp_path):
  workdir = str(tmp_path)
  code, output = _finish(_start(workdir, env, program=faults.main_with_nan_batch(7)))
  assert code == 1
  last = output.strip().splitlines()[-1]
  assert last.startswith("error: loss nan") and "at step 7" in last
  assert "latest checkpoint (step 6) is the last good state" in last
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [4, 6]
  losses = _train_losses(workdir)
  assert max(losses) == 6  # the poisoned step is neither logged nor saved
  reference_losses = _train_losses(reference)
  assert all(losses[s] == reference_losses[s] for s in losses)


def test_the_eval_input_is_built_once_at_the_first_eval(monkeypatch):
  made = []

  def create_iterator(data_config, **kwargs):
    made.append(kwargs)
    return itertools.count()

  monkeypatch.setattr(pipeline, "create_iterator", create_iterator)
  config = experiment_config("demo")
  config.eval_batches = 3
  eval_input = pretrain.EvalInput(config, (1, 2))
  assert not made  # nothing is read before the first eval
  assert [list(eval_input.batches()) for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]
  assert len(made) == 1 and made[0]["num_batches"] == 3  # which repeats the first 3 batches
  assert (made[0]["shard_index"], made[0]["shard_count"]) == (1, 2) and not made[0]["train"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_command_end_to_end(tmp_path):
  """The README's main job: `python main.py --config=configs/demo.py --workdir=DIR` (minutes)."""
  workdir = str(tmp_path)
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/demo.py",
                         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=1700)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  train = [r["loss"] for r in records if r["split"] == "train"]
  evals = [r["loss"] for r in records if r["split"] == "eval"]
  assert len(evals) >= 2 and evals[-1] < evals[0]
  assert np.mean(train[-3:]) < 0.8 * train[0]
  config = checkpointing.load_config(workdir)
  assert str(config.num_train_steps) in os.listdir(os.path.join(workdir, "checkpoints"))
  pictures = os.listdir(os.path.join(workdir, "reconstructions"))
  assert f"step_{config.num_train_steps:08d}.png" in pictures
