"""Host loss: the watchdog's verdicts (in-process, a fake key-value store), then end to end with
two `main.py` processes on one machine: env-only launch, kill -9 of one, restart (slow)."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from audiomaepp import checkpointing
from audiomaepp import hosts
from audiomaepp import metrics

import main_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_LOST = 75


class _Store:
  """The coordination service's key-value store, shared by the fake clients of one test."""

  def __init__(self):
    self.values, self.lock = {}, threading.Lock()


class _Client:
  """One process's client; `dead` makes every call fail, as when the process or service dies."""

  def __init__(self, store):
    self.store, self.dead = store, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.dead:
      raise RuntimeError("UNAVAILABLE")
    with self.store.lock:
      assert allow_overwrite or key not in self.store.values
      self.store.values[key] = value

  def key_value_dir_get(self, prefix):
    if self.dead:
      raise RuntimeError("UNAVAILABLE")
    with self.store.lock:
      return [(k, v) for k, v in self.store.values.items() if k.startswith(prefix)]


def _watchdogs(count, timeout=2.0):
  store, lost = _Store(), {}
  events = [threading.Event() for _ in range(count)]
  clients = [_Client(store) for _ in range(count)]

  def on_lost(me):
    def report(host):
      lost[me] = host
      events[me].set()
    return report

  dogs = [hosts.HostWatchdog(clients[i], i, count, on_lost(i), timeout=timeout, interval=0.05)
          for i in range(count)]
  for dog in dogs:
    dog.start()
  return dogs, clients, events, lost


def test_every_survivor_names_the_silent_host():
  dogs, clients, events, lost = _watchdogs(3)
  clients[1].dead = True  # process 1 stops beating (killed): 0 and 2 must name it
  assert events[0].wait(10) and events[2].wait(10)
  assert lost[0] == 1 and lost[2] == 1
  for dog in dogs:
    dog.finish()


def test_hosts_that_finish_are_not_lost():
  dogs, _, events, lost = _watchdogs(2)
  time.sleep(0.3)
  dogs[1].finish()  # a normal end: its beats stop, after it said so
  assert not events[0].wait(5.0), lost  # 2.5 x the timeout
  dogs[0].finish()


def test_an_unanswering_coordinator_is_host_0():
  dogs, clients, events, lost = _watchdogs(2)
  clients[1].dead = True  # process 1 can no longer reach the service that process 0 hosts
  assert events[1].wait(10) and lost[1] == 0
  for dog in dogs:
    dog.finish()


# End to end: two processes of main.py on one machine, one CPU device each.

STEPS = 16
SHRUNK = main_runs.shrunk_demo(STEPS, checkpoint_every=3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return main_runs.fast_env(tmp_path_factory.mktemp("jax_cache"), devices=1)


def _start_pair(workdir, env, port, wrap=()):
  """Both processes, configured by the environment only (no distributed flags), each in its own
  session; `wrap` prefixes the command (the supervisor)."""
  procs = []
  for i in range(2):
    penv = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [*wrap, sys.executable, "main.py", *SHRUNK, f"--workdir={workdir}"], cwd=REPO,
        env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True))
  return procs


def _train_losses(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _wait_for_step(procs, workdir, step):
  deadline = time.time() + 400
  while max(_train_losses(workdir), default=0) < step:
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      main_runs.finish(procs, timeout=1)
      pytest.fail(f"a process ended or stalled before step {step}")
    time.sleep(0.02)


def _wait_for_checkpoint(procs, workdir, step):
  deadline = time.time() + 400
  while (checkpointing.latest_complete_step(workdir) or 0) < step:
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      main_runs.finish(procs, timeout=1)
      pytest.fail(f"a process ended or stalled before checkpoint {step} was complete")
    time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted env-only 2-process run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  codes, outputs = main_runs.finish(_start_pair(workdir, env, main_runs.free_port()))
  assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
  return workdir


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_env_only_two_process_launch_trains(reference):
  losses = _train_losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) for v in losses.values())
  assert losses[STEPS] < losses[1]
  assert checkpointing.latest_complete_step(reference) == STEPS


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_of_one_host_survivor_reports_and_exits_then_both_resume(tmp_path, env,
                                                                      reference):
  workdir = str(tmp_path / "w")
  procs = _start_pair(workdir, env, main_runs.free_port())
  _wait_for_step(procs, workdir, 7)
  _wait_for_checkpoint(procs, workdir, 6)  # saves finish asynchronously, after later steps
  os.killpg(procs[1].pid, signal.SIGKILL)
  killed = time.monotonic()
  try:
    procs[0].wait(timeout=60)
  except subprocess.TimeoutExpired:
    pass
  seconds = time.monotonic() - killed
  codes, outputs = main_runs.finish(procs, timeout=5)
  last = outputs[0].strip().splitlines()[-1]
  print(f"survivor: exit status {codes[0]} after {seconds:.1f} s; last line: {last}")
  assert codes[0] == HOST_LOST and seconds <= 15
  checkpoint = checkpointing.latest_complete_step(workdir)
  assert checkpoint is not None and checkpoint >= 6
  assert last.startswith("error: host 1 lost at step ")
  assert last.endswith(f"; last checkpoint: step {checkpoint}")
  step = int(last.split("at step ")[1].split(";")[0])
  assert checkpoint <= step <= STEPS

  codes, outputs = main_runs.finish(_start_pair(workdir, env, main_runs.free_port()))
  assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
  assert f"resumed from checkpoint step {checkpoint}" in outputs[0]
  losses, expected = _train_losses(workdir), _train_losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([losses[s] for s in sorted(losses)],
                                [expected[s] for s in sorted(losses)])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_of_the_coordinator_ends_the_survivor_and_its_supervisor_reports_it(tmp_path, env):
  """Process 0 hosts the coordination service: JAX's client aborts the survivor within seconds
  (status 134); its supervisor prints the one-line report from that status and the workdir."""
  workdir = str(tmp_path / "w")
  supervise = (os.path.join(REPO, "launch", "supervise.sh"), "--max_restarts", "0", "--")
  procs = _start_pair(workdir, env, main_runs.free_port(), wrap=supervise)
  _wait_for_step(procs, workdir, 5)
  trainer = int(subprocess.run(["pgrep", "-P", str(procs[0].pid)], capture_output=True,
                               text=True, check=True).stdout.split()[0])
  os.kill(trainer, signal.SIGKILL)
  killed = time.monotonic()
  try:
    procs[1].wait(timeout=60)
  except subprocess.TimeoutExpired:
    pass
  seconds = time.monotonic() - killed
  codes, outputs = main_runs.finish(procs, timeout=5)
  errors = [line for line in outputs[1].splitlines() if line.startswith("error:")]
  print(f"survivor: exit status {codes[1]} after {seconds:.1f} s; error line: {errors}")
  assert codes[1] == 134 and seconds <= 15
  checkpoint = checkpointing.latest_complete_step(workdir)
  assert errors == [f"error: the command aborted (status 134), as JAX does when the coordinator "
                    f"(process 0) is lost; last checkpoint: step {checkpoint}"]
  assert "supervise: the command ended with an abort (status 134) after 0 restarts: giving up" in outputs[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_supervisor_restarts_after_a_kill_at_a_random_step_and_losses_match(tmp_path, env,
                                                                           reference):
  workdir = str(tmp_path / "w")
  supervise = (os.path.join(REPO, "launch", "supervise.sh"), "--max_restarts", "3",
               "--backoff", "20", "--")
  procs = _start_pair(workdir, env, main_runs.free_port(), wrap=supervise)
  kill_step = random.Random(os.getpid()).randint(3, STEPS - 3)
  _wait_for_step(procs, workdir, kill_step)
  victim = random.Random(os.getpid() + 1).randint(0, 1)
  trainer = int(subprocess.run(["pgrep", "-P", str(procs[victim].pid)], capture_output=True,
                               text=True, check=True).stdout.split()[0])
  os.kill(trainer, signal.SIGKILL)
  codes, outputs = main_runs.finish(procs)
  print(f"killed process {victim} at step {kill_step}")
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  assert "supervise: the command ended with signal 9; restart 1 of 3" in outputs[victim]
  assert "restart 1 of 3" in outputs[1 - victim]
  losses, expected = _train_losses(workdir), _train_losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([losses[s] for s in sorted(losses)],
                                [expected[s] for s in sorted(losses)])
