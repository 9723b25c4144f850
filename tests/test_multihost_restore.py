"""Two processes restoring one workdir agree on the step: a step damaged as one host reads it is
skipped by both (for training's `restore_with_fallback` and for `restore_params`), and a transient
read error on one host is retried, so both restore the newest."""
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from audiomaepp import checkpointing
import main_runs
import restore_process

pytestmark = pytest.mark.integration


def _run_two_processes(workdir, fault, restore):
  """Runs tests/restore_process.py as processes 0 and 1; their (status, stdout, stderr)."""
  port = main_runs.free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(main_runs.REPO, "tests", "restore_process.py"), str(workdir),
       str(port), str(i), fault, restore], cwd=main_runs.REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=120) for proc in procs]
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


def _restore_on_two_processes(workdir, fault, restore="with_fallback"):
  results = []
  for status, out, err in _run_two_processes(workdir, fault, restore):
    assert status == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


@pytest.fixture
def workdir(tmp_path):
  with checkpointing.training_manager(str(tmp_path), keep=5) as manager:
    for step in (2, 4, 6):
      checkpointing.save_train_state(manager, step, restore_process.params(step),
                                     {"step": jnp.int32(step)})
    manager.wait_until_finished()
  return tmp_path


@pytest.mark.timeout(300)
def test_a_step_damaged_on_one_host_is_skipped_by_both(workdir):
  first, second = _restore_on_two_processes(workdir, "damaged_6")
  assert second["reads"] == [6, 4]
  for result in (first, second):
    assert (result["step"], result["skipped"], result["kernel_step"]) == (4, [6], 4.0)
  # Process 0 moved it aside once, for both.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert os.listdir(workdir / checkpointing.SKIPPED_DIR) == ["6"]


@pytest.mark.timeout(300)
def test_restore_params_skips_a_step_damaged_on_one_host_on_both(workdir):
  """Without the shared decision, process 0 would read step 6 and process 1 step 4."""
  first, second = _restore_on_two_processes(workdir, "damaged_6", restore="params")
  assert second["reads"] == [6, 4]
  assert first["kernel_step"] == second["kernel_step"] == 4.0
  # Reading moves nothing.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  assert not os.path.exists(workdir / checkpointing.SKIPPED_DIR)


@pytest.mark.timeout(300)
def test_a_transient_error_on_one_host_is_retried_and_both_restore_the_newest(workdir):
  first, second = _restore_on_two_processes(workdir, "transient")
  assert second["reads"] == [6, 6]
  for result in (first, second):
    assert (result["step"], result["skipped"], result["kernel_step"]) == (6, [], 6.0)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


@pytest.mark.timeout(300)
def test_a_bug_on_one_host_keeps_its_traceback_there_and_stops_the_other(workdir):
  first, second = _run_two_processes(workdir, "bug", "params")
  assert first[0] != 0 and second[0] != 0
  assert "Traceback" in second[2] and "KeyError: 'a bug on process 1'" in second[2]
  assert re.search(r"RuntimeError: another process failed to restore checkpoint step 6 of \S+ "
                   r"\(see its log\)", first[2]), first[2][-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
