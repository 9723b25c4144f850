"""Shared test fixtures: the reference data made with the original PyTorch implementation."""
import pathlib
import subprocess
import sys

import pytest

from audiomaepp import experiment

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
MAKE_SUITE = FIXTURES.parent / "evalsuite" / "make_suite.py"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def experiment_config(name: str):
  """`get_config()` of configs/<name>.py, loaded by path as main.py does."""
  return experiment.load_config(CONFIGS / f"{name}.py")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES} (expected ../shared beside the checkout)")
  return FIXTURES


@pytest.fixture(scope="session")
def hear_suite_dir(tmp_path_factory) -> pathlib.Path:
  """HEAR-format tasks kws-v1 (10 words) and pitch-v1 (24 notes), 5 clips per class (~5 s)."""
  out = tmp_path_factory.mktemp("hear_suite")
  command = [sys.executable, str(MAKE_SUITE), "--out", str(out), "--tasks", "kws,pitch",
             "--per_class", "5"]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    pytest.fail(f"{MAKE_SUITE} failed (it needs espeak-ng, fluidsynth and fluid-soundfont-gm):\n"
                f"{done.stderr}")
  return out
