"""Config errors through `main.py`: each fails before anything is compiled, with one clear line.

The field checks themselves are unit-tested (tests/test_main.py); here two cases, one per path
(the model's fields, the data), show the wiring. Both programs run concurrently (each spends its
few seconds importing JAX); each must exit with status 1, end stderr with a single `error: ...`
line naming the field or directory, show no traceback, compile nothing (JAX_LOG_COMPILES) and
leave no workdir behind.
"""
import os
import pathlib
import subprocess
import sys

import pytest

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[1]

CASES = {
    # The demo config (width/depth/heads set, size None) must accept the override to reject it.
    "unknown_model_size": (["--config=configs/demo.py", "--config.model.size=gigantic"],
                           "error: config.model.size='gigantic': expected one of ['tiny'"),
    "missing_data_directory": (["--config.data.data_dir={tmp}/no_such_dir"],
                               "error: no built dataset 'audio_logmel' under "),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{case: (workdir, CompletedProcess-like (returncode, stderr))} for every case, run at once."""
  tmp = tmp_path_factory.mktemp("config_errors")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
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
