"""Pretraining survives kill -9, damaged checkpoints and a full disk, and loses nothing.

Every run is `main.py` on the demo config shrunk to seconds, in its own session (so the whole
process group, Grain workers included, can be killed at once, as a scheduler would). After each
kill: no process of the run survives and nothing is left in /dev/shm. After the last resume: the
run completes and every loss ever logged for a step, by any of the runs, equals the loss of an
uninterrupted run bit for bit (CPU). SIGTERM and NaN stops are proven in tests/test_train_loop.py.
"""
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional
import uuid

import numpy as np
import pytest

from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp import metrics
import faults
import main_runs

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
EVERY = 3  # checkpoint_every_steps
SHRUNK = main_runs.shrunk_demo(STEPS, checkpoint_every=EVERY)
WORKERS = "--config.data.num_workers=2"
# Checkpoint array files of the shrunk model are 0.2-1.3 MB; everything else a run writes
# (metrics, TensorBoard scalars, the loss curve) stays far below this.
FILE_SIZE_LIMIT = 100_000
TMP_MARK = "orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: CPU, a compilation cache shared by the module's runs, and XLA's
  fastest compile (every run, reference included, uses the same flags)."""
  return main_runs.fast_env(tmp_path_factory.mktemp("jax_cache"))


class Run:
  """One `main.py` process in a new session, its output in a log file, tagged with a unique
  environment variable so that any process it leaves behind can be found."""

  def __init__(self, workdir: pathlib.Path, env: dict, *extra: str,
               file_size_limit: Optional[int] = None):
    self.workdir = workdir
    self.tag = uuid.uuid4().hex
    self.log_path = workdir.parent / f"{workdir.name}-{self.tag[:8]}.log"
    self.shm_before = faults.shm_entries()
    command = [sys.executable, "main.py", *SHRUNK, f"--workdir={workdir}", *extra]
    if file_size_limit is not None:
      command = faults.with_file_size_limit(command, file_size_limit)
    # Output goes through a pipe, which a file size limit does not cut short.
    self.proc = subprocess.Popen(
        command, cwd=REPO, env=dict(env, AUDIOMAEPP_TEST_RUN=self.tag), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    self._copier = threading.Thread(target=self._copy_output, daemon=True)
    self._copier.start()

  def _copy_output(self) -> None:
    with open(self.log_path, "wb") as log:
      for line in self.proc.stdout:
        log.write(line)
        log.flush()

  @property
  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def wait(self, timeout: float = 300) -> int:
    """Waits for the run to exit and for all its output."""
    try:
      code = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      faults.kill_session(self.proc.pid)
      raise
    self._copier.join(30)
    return code

  def wait_for(self, condition, what: str, timeout: float = 300) -> None:
    """Polls `condition()` every millisecond; fails if the run ends or stalls first."""
    deadline = time.time() + timeout
    while not condition():
      if self.proc.poll() is not None or time.time() > deadline:
        faults.kill_session(self.proc.pid)
        pytest.fail(f"run ended or stalled before {what}:\n{self.log[-3000:]}")
      time.sleep(0.001)

  def kill_group(self) -> None:
    """kill -9 of the whole process group; then nothing of the run may remain."""
    survivors = faults.kill_session(self.proc.pid)
    self.wait()
    assert not survivors, f"processes of the killed run survived: {survivors}"
    deadline = time.time() + 10  # the resource tracker needs a moment to unlink
    while time.time() < deadline and (self.leaked_shm() or faults.tagged_processes(self.tag)):
      time.sleep(0.05)
    assert not faults.tagged_processes(self.tag), faults.tagged_processes(self.tag)
    leaked = self.leaked_shm()
    if leaked:  # or in flight between processes of another job on this machine: those go soon
      time.sleep(5)
      leaked &= self.leaked_shm()
    assert not leaked, f"/dev/shm entries leaked: {sorted(leaked)}"

  def leaked_shm(self) -> set[str]:
    return faults.unreferenced_shm(faults.shm_entries() - self.shm_before)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  records = metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _logged_steps(workdir: pathlib.Path) -> list[int]:
  records = metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
  return [r["step"] for r in records if r["split"] == "train"]


def _checkpoints(workdir: pathlib.Path) -> tuple[list[int], list[str]]:
  """(complete steps, temporary directories of unfinished saves)."""
  names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def _resumed_from(log: str) -> int:
  """The step a run resumed from (0: it started from scratch)."""
  found = re.findall(r"resumed from checkpoint step (\d+)", log)
  assert len(found) <= 1, log[-3000:]
  return int(found[0]) if found else 0


def _reference(workdir: pathlib.Path, env: dict, *extra: str) -> dict[int, float]:
  run = Run(workdir, env, *extra)
  assert run.wait() == 0, run.log[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted run: the losses every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("reference") / "workdir"
  return workdir, _reference(workdir, env)


def _kill_at_random_moment(run: Run, rng: random.Random) -> None:
  step = rng.randint(1, STEPS - 2)
  run.wait_for(lambda: max(_losses(run.workdir), default=0) >= step, f"step {step}")
  time.sleep(rng.uniform(0.0, 0.5))  # anywhere in the following step(s)
  run.kill_group()


def _kill_during_checkpoint_write(run: Run, after_step: int) -> int:
  """Kills the run as soon as a save of a step > `after_step` has started writing; returns it."""
  def writing():
    return [n for n in _checkpoints(run.workdir)[1] if int(n.split(".")[0]) > after_step]
  run.wait_for(writing, f"a checkpoint write after step {after_step}")
  run.kill_group()
  unfinished = writing()
  assert unfinished, "the save finished before the kill (no temporary directory left)"
  return int(unfinished[0].split(".")[0])


def _mismatches(logged: list[tuple[int, float]], expected: dict[int, float]) -> list:
  return [(step, loss, expected[step]) for step, loss in logged if loss != expected[step]]


@pytest.mark.timeout(600)
def test_kill9_at_a_random_moment_and_during_a_checkpoint_write_then_resume(reference, env,
                                                                           tmp_path):
  _, expected = reference
  workdir = tmp_path / "workdir"
  logged = []  # every loss any run logged (a resumed run drops those after its checkpoint)

  run = Run(workdir, env)
  _kill_at_random_moment(run, random.Random(0))
  logged += _losses(workdir).items()

  run = Run(workdir, env)
  writing = _kill_during_checkpoint_write(run, after_step=max(_checkpoints(workdir)[0], default=0))
  complete, unfinished = _checkpoints(workdir)
  assert writing not in complete and unfinished
  logged += _losses(workdir).items()

  # Resume to the end: from the newest complete checkpoint, never the half-written one.
  run = Run(workdir, env)
  assert run.wait() == 0, run.log[-3000:]
  assert _resumed_from(run.log) == max(complete, default=0)
  complete, unfinished = _checkpoints(workdir)
  assert complete == [STEPS - EVERY, STEPS] and not unfinished  # the temporary one is removed
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))  # each step once
  logged += _losses(workdir).items()
  assert not _mismatches(logged, expected), _mismatches(logged, expected)  # bit for bit


@pytest.mark.timeout(300)
def test_kill9_with_grain_workers_leaves_no_process_or_shared_memory(env, tmp_path):
  run = Run(tmp_path / "workdir", env, WORKERS)
  run.wait_for(lambda: max(_losses(run.workdir), default=0) >= 2, "step 2")
  processes = faults.session_processes(run.proc.pid)
  assert len([c for _, c in processes if "spawn_main" in c]) == 2, processes
  assert faults.shm_entries() - run.shm_before, "no shared memory in use"
  run.kill_group()  # asserts that no process, in the session or not, and no /dev/shm entry remains


@pytest.mark.timeout(600)
def test_damaged_latest_checkpoint_and_full_disk(reference, env, tmp_path):
  reference_dir, expected = reference
  workdir = tmp_path / "workdir"
  shutil.copytree(reference_dir, workdir)
  assert faults.truncate_checkpoint_arrays(workdir / "checkpoints" / str(STEPS))

  # The damaged step is skipped with its reason; every save of this run fails (EFBIG, as a full
  # disk fails it): training still reaches the end, then reports that the save was lost.
  run = Run(workdir, env, file_size_limit=FILE_SIZE_LIMIT)
  assert run.wait() == 1, run.log[-3000:]
  log = run.log
  assert re.search(rf"checkpoint step {STEPS} cannot be restored, skipping it \(\w+", log), log
  assert f"restored step {STEPS - EVERY} after skipping damaged steps [{STEPS}]" in log
  assert _resumed_from(log) == STEPS - EVERY
  # (Orbax's write tasks still in flight may print tracebacks at interpreter exit, after it.)
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, log[-3000:]
  assert errors[0].startswith(f"error: checkpoint save at step {STEPS} failed"), errors[0]
  assert "File too large" in errors[0]
  assert errors[0].endswith(f"latest complete checkpoint: {STEPS - EVERY}")
  assert _checkpoints(workdir)[0] == [STEPS - EVERY]
  assert os.listdir(workdir / "checkpoints_skipped") == [str(STEPS)]  # kept for inspection
  # The failed save's temporary directory is removed, though writes still in flight when the save
  # failed may recreate part of it; the next start's checkpoint manager removes what is left.
  checkpointing.training_manager(str(workdir), keep=2).close()
  assert _checkpoints(workdir) == ([STEPS - EVERY], [])
  assert _losses(workdir) == expected  # training itself was unaffected

  # The previous checkpoint is intact: the model restores from it (the HEAR API's loader).
  model = hear_api.load_model(str(workdir))
  scene = hear_api.get_scene_embeddings(np.zeros((1, 16000), np.float32), model)
  assert np.isfinite(np.asarray(scene)).all()


@pytest.mark.timeout(300)
def test_resuming_with_another_worker_count_continues_exactly(reference, env, tmp_path):
  """The data order does not depend on the Grain worker count, and no iterator state is saved:
  a run saved without workers resumes with 2 and logs the same losses."""
  reference_dir, expected = reference
  workdir = tmp_path / "workdir"
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  run = Run(workdir, env, WORKERS)
  assert run.wait() == 0, run.log[-3000:]
  assert _resumed_from(run.log) == STEPS - EVERY
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
  assert _losses(workdir) == expected


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("seed", range(6))
def test_repeated_random_kills_until_done(reference, env, tmp_path, seed):
  """Heavy variant: four kill -9s at random moments (a third during checkpoint writes; odd seeds
  with Grain workers), then a run to the end; every logged loss equals the uninterrupted run's."""
  _, expected = reference
  workers = (WORKERS,) if seed % 2 else ()
  rng = random.Random(seed)
  workdir = tmp_path / "workdir"
  logged = []
  for _ in range(4):
    run = Run(workdir, env, *workers)
    if rng.random() < 1 / 3:
      _kill_during_checkpoint_write(run, after_step=max(_checkpoints(workdir)[0], default=0))
    else:
      _kill_at_random_moment(run, rng)
    logged += _losses(workdir).items()
  run = Run(workdir, env, *workers)
  assert run.wait() == 0, run.log[-3000:]
  logged += _losses(workdir).items()
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
  assert _checkpoints(workdir) == ([STEPS - EVERY, STEPS], [])
  assert not _mismatches(logged, expected), _mismatches(logged, expected)


@pytest.mark.timeout(300)
def test_restart_with_another_model_fails_fast_and_keeps_the_workdir(reference, env, tmp_path):
  """Another num_heads has the same parameter shapes: without the check it would resume with a
  different architecture. Refused in one line before anything is compiled, restored or written;
  the workdir still loads."""
  reference_dir, _ = reference
  workdir = tmp_path / "workdir"
  shutil.copytree(reference_dir, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  run = Run(workdir, dict(env, JAX_LOG_COMPILES="1"), "--config.model.num_heads=2")
  assert run.wait() == 1, run.log[-3000:]
  lines = run.log.strip().splitlines()
  assert lines[-1] == (f"error: config.model differs from the model the checkpoints in {workdir} "
                       "were trained with: num_heads=2 (recorded 4); resume with the recorded "
                       "model, or use a new workdir"), lines[-1]
  assert "Traceback" not in run.log and "Compiling" not in run.log
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  assert hear_api.load_model(str(workdir)).module.config.num_heads == 4
