"""Config errors through `main.py`: each fails before anything is compiled, with one clear line.

The five programs run concurrently (each spends its few seconds importing JAX); every one must
exit with status 1, end stderr with a single `error: config....` line naming the field, show no
traceback, compile nothing (JAX_LOG_COMPILES) and leave no workdir behind.
"""
import os
import pathlib
import subprocess
import sys

import pytest

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"

CASES = {
    # The demo config (width/depth/heads set, size None) must accept the override to reject it.
    "unknown_model_size": (["--config=configs/demo.py", "--config.model.size=gigantic"],
                           "error: config.model.size='gigantic': expected one of ['tiny'"),
    "patch_not_dividing_input": (["--config.model.patch_size=(3, 16)"],
                                 "error: config.model.patch_size=(3, 16) does not divide "
                                 "config.model.input_shape=(200, 80) along axis 0"),
    "mask_ratio_above_one": (["--config.model.mask_ratio=1.5"],
                             "error: config.model.mask_ratio=1.5: expected a value in (0, 1)"),
    "batch_not_divisible_by_devices": (["--config.batch_size=12"],
                                       "error: config.batch_size=12 is not divisible by the 8 "
                                       "devices"),
    "missing_data_directory": (["--config.data.data_dir={tmp}/no_such_dir"],
                               "error: no built dataset 'audio_logmel' under "),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{case: (workdir, CompletedProcess-like (returncode, stderr))} for every case, run at once."""
  tmp = tmp_path_factory.mktemp("config_errors")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}".strip())
  procs = {}
  for case, (overrides, _) in CASES.items():
    workdir = tmp / case
    args = [a.format(tmp=tmp) for a in overrides]
    if not args[0].startswith("--config="):
      args.insert(0, "--config=configs/base.py")
    procs[case] = (workdir, subprocess.Popen(
        [sys.executable, "main.py", f"--workdir={workdir}", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for case, (workdir, proc) in procs.items():
    _, stderr = proc.communicate(timeout=180)
    results[case] = (workdir, proc.returncode, stderr)
  return tmp, results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_config_error_fails_before_compiling_with_one_line(runs, case):
  tmp, results = runs
  workdir, returncode, stderr = results[case]
  lines = stderr.strip().splitlines()
  assert returncode == 1, stderr[-3000:]
  assert lines[-1].startswith(CASES[case][1]), lines[-1]
  assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
  assert "Traceback" not in stderr
  assert "Compiling" not in stderr  # JAX_LOG_COMPILES logs every compilation
  assert not workdir.exists()  # nothing recorded for a run that never started
  if case == "missing_data_directory":
    assert f"{tmp}/no_such_dir" in lines[-1] and "prepare_dataset" in lines[-1]
