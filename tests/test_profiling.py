"""Traces of chosen steps (config.profile_steps) and the default persistent compilation cache."""
import glob
import os
import subprocess
import sys

import jax
import pytest

from audiomaepp import profiling
from audiomaepp.errors import UserError
import main_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value, steps", [("", None), (" ", None), ("5", (5, 5)),
                                          ("2,4", (2, 4)), (" 2, 4 ", (2, 4))])
def test_profile_steps_parse(value, steps):
  assert profiling.parse_steps(value) == steps


@pytest.mark.parametrize("value", ["0,3", "4,2", "a,b", "1,2,3", "2,"])
def test_bad_profile_steps_name_the_field(value):
  with pytest.raises(UserError, match=f"config.profile_steps='{value}': expected 'a,b'"):
    profiling.parse_steps(value)


@pytest.fixture
def traces(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda log_dir: calls.append(("start", log_dir)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  return calls


def _run(profiler, steps):
  for step in steps:
    profiler.before(step)
    profiler.after(step, jax.numpy.zeros(()))


def test_the_trace_spans_the_chosen_steps(traces):
  profiler = profiling.StepProfiler("3,4", "w")
  seen = []
  for step in range(1, 7):
    profiler.before(step)
    seen.append((step, profiler.active))
    profiler.after(step, jax.numpy.zeros(()))
  profiler.close()
  assert traces == [("start", "w"), ("stop",)]
  assert [step for step, active in seen if active] == [3, 4]


def test_a_resumed_run_traces_from_its_first_step(traces):
  _run(profiling.StepProfiler("3,6", "w"), range(5, 9))  # resumed at step 5
  assert traces == [("start", "w"), ("stop",)]


def test_a_run_ending_inside_the_trace_stops_it_on_close(traces):
  profiler = profiling.StepProfiler("3,10", "w")
  _run(profiler, range(1, 6))
  assert traces == [("start", "w")]
  profiler.close()
  assert traces == [("start", "w"), ("stop",)]
  _run(profiling.StepProfiler("", "w"), range(1, 4))
  assert len(traces) == 2


@pytest.mark.integration
def test_main_writes_a_trace_and_fills_the_users_local_cache(tmp_path):
  env = main_runs.fast_env(tmp_path / "unused")
  del env["JAX_COMPILATION_CACHE_DIR"]  # the default: this user's local cache
  env["XDG_CACHE_HOME"] = str(tmp_path / "home_cache")
  workdir = tmp_path / "runs" / "demo"
  done = subprocess.run([sys.executable, "main.py", *main_runs.shrunk_demo(4, checkpoint_every=4),
                         "--config.profile_steps=2,3", f"--workdir={workdir}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert glob.glob(str(workdir / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert os.listdir(tmp_path / "home_cache" / "audiomaepp" / "jax_compilation_cache")
  assert sorted(os.listdir(tmp_path / "runs")) == ["demo"]  # nothing beside the workdir
  assert f"profiled steps 2-3: tensorboard --logdir={workdir}" in done.stderr
