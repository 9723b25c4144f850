"""Shared test fixtures: the reference data made with the original PyTorch implementation.

The reference data live in tests/fixtures (how they were made: tests/fixtures/README.md). Two
things come from outside the repository when a `shared/` folder stands beside the checkout: the
original PyTorch code (`../shared/original`, for the tests that run it) and the HEAR task
generator (`../shared/evalsuite/make_suite.py`); tests needing either skip, saying so, when absent.

In CI (`CI=true`) a skipped test fails the run, unless tests/allowed_skips.txt lists it with its
reason: CI has everything the tests need, so a skip there is evidence that did not run.
"""
import contextlib
import importlib
import os
import pathlib
import subprocess
import sys

from absl import flags
import pytest

from audiomaepp import experiment

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
ORIGINAL_CODE = SHARED / "original"
MAKE_SUITE = SHARED / "evalsuite" / "make_suite.py"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ALLOWED_SKIPS = pathlib.Path(__file__).resolve().parent / "allowed_skips.txt"
_SKIPPED: list[str] = []


def allowed_skips(path: pathlib.Path = ALLOWED_SKIPS) -> dict[str, str]:
  """{test id: reason} of the skips CI accepts: lines `tests/test_x.py::test_y  # reason` (a
  test id without its parameters covers all of them)."""
  allowed = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    test, _, reason = line.partition("#")
    if not reason.strip():
      raise ValueError(f"{path}:{number}: {test.strip()} has no reason: write `TEST  # why`")
    allowed[test.strip()] = reason.strip()
  return allowed


def unexpected_skips(skipped: list[str], allowed: dict[str, str]) -> list[str]:
  """The skipped test ids that `allowed` does not list (by full id or by id without parameters)."""
  return [test for test in skipped if test not in allowed and test.split("[")[0] not in allowed]


def pytest_runtest_logreport(report):
  if report.skipped and not hasattr(report, "wasxfail"):
    _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
  if os.environ.get("CI") != "true" or exitstatus not in (0, 5):
    return
  unexpected = unexpected_skips(_SKIPPED, allowed_skips())
  if unexpected:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line(f"CI: {len(unexpected)} skipped test(s) not listed in {ALLOWED_SKIPS} "
                        f"(evidence that did not run): {', '.join(unexpected)}", red=True)
    session.exitstatus = 1


@contextlib.contextmanager
def benchmark_module(name: str):
  """Imports benchmarks/NAME.py; on exit forgets the module and the absl flags it defined, so
  benchmarks with flags of the same name (--steps, --seeds) can be tested in one process."""
  before = set(flags.FLAGS)
  path = str(CONFIGS.parent / "benchmarks")
  sys.path.insert(0, path)
  try:
    yield importlib.import_module(name)
  finally:
    sys.path.remove(path)
    sys.modules.pop(name, None)
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)


def require_make_suite() -> pathlib.Path:
  """MAKE_SUITE, or skips the calling test when it is not beside the checkout."""
  if not MAKE_SUITE.is_file():
    pytest.skip(f"the HEAR task generator {MAKE_SUITE} is absent (no ../shared beside the "
                "checkout)")
  return MAKE_SUITE


def experiment_config(name: str):
  """`get_config()` of configs/<name>.py, loaded by path as main.py does."""
  return experiment.load_config(CONFIGS / f"{name}.py")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES}")
  return FIXTURES


@pytest.fixture(scope="session")
def hear_suite_dir(tmp_path_factory) -> pathlib.Path:
  """HEAR-format tasks kws-v1 (10 words) and pitch-v1 (24 notes), 5 clips per class (~5 s)."""
  make_suite = require_make_suite()
  out = tmp_path_factory.mktemp("hear_suite")
  command = [sys.executable, str(make_suite), "--out", str(out), "--tasks", "kws,pitch",
             "--per_class", "5"]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    pytest.fail(f"{MAKE_SUITE} failed (it needs espeak-ng, fluidsynth and fluid-soundfont-gm):\n"
                f"{done.stderr}")
  return out
