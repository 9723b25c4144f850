"""The data order does not depend on the number of hosts: `main.py` as P processes x D CPU
devices (coordinator on 127.0.0.1) logs the losses of one process, and a run saved by one host
count resumes on another at exactly the next global batch.
"""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from audiomaepp import metrics

import main_runs

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
SHRUNK = main_runs.shrunk_demo(STEPS, checkpoint_every=2, eval_every=STEPS)
# float32 on CPU: the same program on another device layout sums in another order.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return main_runs.fast_env(tmp_path_factory.mktemp("jax_cache"))


def _launch(workdir, processes: int, devices: int, env: dict) -> list[subprocess.Popen]:
  """`processes` main.py processes with `devices` CPU devices each, each in its own session."""
  env = dict(env, XLA_FLAGS="--xla_backend_optimization_level=0 "
                            f"--xla_force_host_platform_device_count={devices}")
  cluster = []
  if processes > 1:
    cluster = [f"--coordinator_address=127.0.0.1:{main_runs.free_port()}",
               f"--num_processes={processes}"]
  return [subprocess.Popen(
      [sys.executable, "main.py", *SHRUNK, f"--workdir={workdir}", *cluster,
       *([f"--process_id={i}"] if cluster else [])],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True) for i in range(processes)]


def _wait(procs: list[subprocess.Popen], timeout: float = 540) -> list[str]:
  """Waits for every process and returns their outputs; kills all their groups and fails if one
  fails or hangs."""
  try:
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  except subprocess.TimeoutExpired:
    outputs = ["timed out"] * len(procs)
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  return outputs


def _losses(workdir, split="train") -> dict[int, float]:
  records = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  return {r["step"]: r["loss"] for r in records if r["split"] == split}


def _assert_close(losses: dict[int, float], expected: dict[int, float]) -> None:
  assert sorted(losses) == sorted(expected)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [expected[s] for s in sorted(expected)], rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
  """Workdirs of the same run as 1 process x 2 devices and as 2 processes x 1 device (started
  together: the three processes share the cores)."""
  workdirs = {layout: str(tmp_path_factory.mktemp(layout)) for layout in ("1x2", "2x1")}
  procs = [_launch(workdirs["1x2"], 1, 2, env), _launch(workdirs["2x1"], 2, 1, env)]
  for group in procs:
    _wait(group)
  return workdirs


@pytest.mark.timeout(600)
def test_two_processes_log_the_losses_of_one(runs):
  expected = _losses(runs["1x2"])
  assert sorted(expected) == list(range(1, STEPS + 1))
  for split in ("train", "eval"):
    _assert_close(_losses(runs["2x1"], split), _losses(runs["1x2"], split))


def _resume(source_workdir, workdir, processes, devices, env) -> None:
  """Copies a finished run without its last checkpoint and resumes it on another layout."""
  shutil.copytree(source_workdir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  outputs = _wait(_launch(workdir, processes, devices, env))
  assert all(f"resumed from checkpoint step {STEPS - 2}" in output for output in outputs)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_by_two_and_resuming_on_another_host_count(runs, env, tmp_path):
  expected = _losses(runs["1x2"])
  two_by_two = str(tmp_path / "2x2")
  _wait(_launch(two_by_two, 2, 2, env))
  _assert_close(_losses(two_by_two), expected)
  # Saved by 2 hosts at step 2, resumed on 1 (and the other way): steps 3 and 4 as uninterrupted.
  for source, (processes, devices) in (("2x1", (1, 2)), ("1x2", (2, 1))):
    workdir = str(tmp_path / f"{source}-resumed")
    _resume(runs[source], workdir, processes, devices, env)
    _assert_close(_losses(workdir), expected)
