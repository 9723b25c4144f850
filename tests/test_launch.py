"""Launch scripts: bash syntax, dry runs (nothing is started), the supervisor's restart policy
(on stand-in commands), and the multi-process settings each SLURM task would get."""
import os
import signal
import re
import shlex
import shutil
import subprocess

import pytest

from audiomaepp import errors
from audiomaepp import parallel

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ("local.sh", "slurm_gpu.sbatch", "tpu_pod.sh", "supervise.sh")


def _bash(*args, env=None):
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
  proc = _bash("-n", os.path.join(LAUNCH, script))
  assert proc.returncode == 0, proc.stderr


def _last_command(proc):
  assert proc.returncode == 0, proc.stderr
  return shlex.split(proc.stdout.strip().splitlines()[-1])


def test_local_dry_run_passes_overrides():
  words = _last_command(_bash(os.path.join(LAUNCH, "local.sh"), "--dry-run", "configs/demo.py",
                              "/tmp/w d", "--config.num_train_steps=3"))
  assert words[1].endswith("main.py")
  assert words[2:] == ["--config=configs/demo.py", "--workdir=/tmp/w d",
                       "--config.num_train_steps=3"]


def test_slurm_dry_run_uses_srun():
  words = _last_command(_bash(os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--dry-run",
                              "configs/base.py", "/shared/run", "--config.batch_size=2048"))
  assert words[0] == "srun" and words[-3:] == ["--config=configs/base.py",
                                                "--workdir=/shared/run",
                                                "--config.batch_size=2048"]


_SLURM_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                   "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT")


def test_slurm_two_nodes_of_eight_gpus_use_all_sixteen(monkeypatch):
  """The allocation the script asks for, each of its tasks resolved as main.py would."""
  proc = _bash(os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--dry-run", "configs/base.py", "/r",
               env={"SLURM_JOB_NUM_NODES": "2"})
  assert proc.returncode == 0, proc.stderr
  allocation = dict(re.findall(r"(\w+)=(\d+)", proc.stdout.splitlines()[0]))
  nodes, tasks_per_node = int(allocation["nodes"]), int(allocation["tasks_per_node"])
  gpus_per_node = int(allocation["gpus_per_node"])
  assert (nodes, tasks_per_node, gpus_per_node, int(allocation["tasks"])) == (2, 8, 8, 16)
  for name in _SLURM_JAX_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[007-008]")
  monkeypatch.setenv("SLURM_STEP_NUM_NODES", str(nodes))
  monkeypatch.setenv("SLURM_NTASKS", str(nodes * tasks_per_node))
  gpus, settings = set(), []
  for node in range(nodes):
    for local in range(tasks_per_node):
      monkeypatch.setenv("SLURM_PROCID", str(node * tasks_per_node + local))
      monkeypatch.setenv("SLURM_LOCALID", str(local))
      s = parallel.resolve_distributed()
      settings.append(s)
      gpus.update((node, gpu) for gpu in s.local_device_ids)
  assert sorted(s.process_id for s in settings) == list(range(16))
  assert {s.num_processes for s in settings} == {16}
  assert {s.coordinator_address.rsplit(":", 1)[0] for s in settings} == {"gpu007"}
  assert len({s.coordinator_address for s in settings}) == 1
  assert len(gpus) == 16 and all(0 <= gpu < gpus_per_node for _, gpu in gpus)
  assert all(len(s.local_device_ids) == 1 for s in settings)


def test_env_only_settings(monkeypatch):
  for name in _SLURM_JAX_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.resolve_distributed() is None
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(errors.UserError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
    parallel.resolve_distributed()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert parallel.resolve_distributed() == parallel.DistributedSettings("10.0.0.1:1234", 4, 3,
                                                                         None)
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "2,3")
  assert parallel.resolve_distributed(process_id=1).local_device_ids == [2, 3]
  assert parallel.resolve_distributed(process_id=1).process_id == 1  # a flag wins
  monkeypatch.setenv("JAX_PROCESS_ID", "three")
  with pytest.raises(errors.UserError, match="JAX_PROCESS_ID='three': expected an integer"):
    parallel.resolve_distributed()


def _supervise(tmp_path, script, *options):
  """Runs the supervisor (no backoff) on a bash stand-in that counts its starts in a file."""
  command = tmp_path / "command.sh"
  command.write_text(f"n=$(( $(cat {tmp_path}/starts 2>/dev/null || echo 0) + 1 ))\n"
                     f"echo $n > {tmp_path}/starts\n{script}\n")
  proc = _bash(os.path.join(LAUNCH, "supervise.sh"), "--backoff", "0", *options, "--", "bash",
               str(command))
  starts = int((tmp_path / "starts").read_text())
  return proc.returncode, starts, proc.stderr


@pytest.mark.parametrize("script,status,starts", [
    ('[[ $n -lt 3 ]] && exit 75; exit 0', 0, 3),            # host lost twice, then done
    ('[[ $n -lt 2 ]] && exit 143; exit 0', 0, 2),           # preempted once
    ('[[ $n -lt 2 ]] && kill -9 $$; exit 0', 0, 2),         # killed by a signal once
    ("exit 1", 1, 1),                                        # an error a restart would repeat
    ("exit 75", 75, 3),                                      # bounded: 2 restarts, then give up
])
def test_supervisor_restart_policy(tmp_path, script, status, starts):
  code, started, stderr = _supervise(tmp_path, script, "--max_restarts", "2")
  assert (code, started) == (status, starts), stderr


@pytest.mark.parametrize("printed,cause", [
    ("", ""),
    ("Terminating process because the JAX distributed service detected fatal errors. This most "
     "likely indicates that another task died", ", as JAX does when the coordinator (process 0) "
     "is lost"),
])
def test_supervisor_reports_an_abort_and_names_the_coordinator_only_when_the_log_does(
    tmp_path, printed, cause):
  workdir = tmp_path / "w"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  command = tmp_path / "command.sh"
  command.write_text(f"echo '{printed}' >&2\nkill -ABRT $$\n")
  proc = _bash(os.path.join(LAUNCH, "supervise.sh"), "--max_restarts", "0", "--", "bash",
               str(command), f"--workdir={workdir}")
  assert proc.returncode == 134
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: the command aborted (status 134){cause}; last checkpoint: step 7"]
  assert "supervise: the command ended with an abort (status 134) after 0 restarts" in proc.stderr
  if printed:
    assert printed in proc.stderr  # the command's own output still reaches the supervisor's


def test_supervisor_passes_sigterm_and_stops(tmp_path):
  command = tmp_path / "command.sh"
  command.write_text(f"trap 'echo term > {tmp_path}/got; exit 143' TERM\n"
                     f"echo $$ > {tmp_path}/pid\nwhile true; do sleep 0.1; done\n")
  proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "supervise.sh"), "--backoff", "0", "--",
                           "bash", str(command)], stderr=subprocess.PIPE, text=True)
  for _ in range(200):
    if (tmp_path / "pid").exists():
      break
    subprocess.run(["sleep", "0.05"], check=True)
  proc.terminate()
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 143, stderr
  assert (tmp_path / "got").read_text().strip() == "term"
  assert "restart" not in stderr


def _committed_checkout(tmp_path):
  """A git checkout holding launch/tpu_pod.sh, committed (setup ships the last commit)."""
  repo = tmp_path / "checkout"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(os.path.join(LAUNCH, "tpu_pod.sh"), repo / "launch")
  git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True,
                                     capture_output=True)
  git("init", "-q")
  git("add", "launch")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "launch")
  return repo


def test_tpu_pod_setup_refuses_uncommitted_changes(tmp_path):
  repo = _committed_checkout(tmp_path)
  script = str(repo / "launch" / "tpu_pod.sh")
  assert _bash(script, "--dry-run", "setup").returncode == 0
  (repo / "untracked.py").write_text("")  # outside the package, configs and launchers: not refused
  assert _bash(script, "--dry-run", "setup").returncode == 0
  (repo / "configs").mkdir()
  (repo / "configs" / "new.py").write_text("")  # a config never added would not be shipped
  refused = _bash(script, "--dry-run", "setup")
  assert refused.returncode == 1 and refused.stdout == ""
  assert refused.stderr.strip() == (
      f"error: {repo}/configs/new.py is not committed and setup ships the last commit (git "
      "archive HEAD): git add and commit it, or remove it")
  (repo / "configs" / "new.py").unlink()
  with open(script, "a") as f:
    f.write("\n")
  refused = _bash(script, "--dry-run", "setup")
  assert refused.returncode == 1 and refused.stdout == ""
  assert refused.stderr.strip() == (
      f"error: {repo} has uncommitted changes and setup ships the last commit (git archive "
      "HEAD): commit or stash them first")


def test_tpu_pod_dry_run_commands(tmp_path):
  env = {"TPU_NAME": "pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-64",
         "PROJECT": "proj"}
  script = str(_committed_checkout(tmp_path) / "launch" / "tpu_pod.sh")
  tpu = lambda *args: _bash(script, "--dry-run", *args, env=env)
  create = _last_command(tpu("create"))
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert "--accelerator-type=v4-64" in create and "--project=proj" in create

  setup = _remote(tpu("setup"))
  assert "uv venv --python 3.11" in setup and "sys.version_info >= (3, 11)" in setup
  assert "gcsfuse" not in setup

  run = _last_command(tpu("run", "configs/base.py", "gs://bucket/runs/base", "--config.seed=3"))
  assert run[4:6] == ["ssh", "pod"] and "--worker=all" in run
  remote = _remote_of(run)
  assert ("launch/supervise.sh --max_restarts 5 --backoff 20 -- .venv/bin/python main.py "
          "--distributed --config=configs/base.py --workdir=gs://bucket/runs/base "
          "--config.seed=3") in remote
  # Detached, one log per worker, the supervisor's pid kept for status and stop.
  assert remote.startswith("cd audiomaepp && mkdir -p logs && { setsid nohup bash -c "
                           "'echo $$ > logs/supervise.pid; exec launch/supervise.sh")
  assert remote.endswith("' >> logs/$(hostname).log 2>&1 < /dev/null & }")

  assert "kill -0 $(cat logs/supervise.pid" in _remote(tpu("status"))
  assert _remote(tpu("logs")) == "tail -n 50 audiomaepp/logs/$(hostname).log"
  assert "--worker=3" in _last_command(tpu("logs", "3"))
  assert _remote(tpu("stop")).startswith("kill -TERM $(cat audiomaepp/logs/supervise.pid)")

  watch = tpu("watch", "configs/base.py", "gs://bucket/runs/base")
  assert watch.returncode == 0, watch.stderr
  assert "recreating it (1 of 10)" in watch.stderr
  lines = [shlex.split(line) for line in watch.stdout.strip().splitlines()]
  assert [w[4] for w in lines if w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]] == [
      "delete", "create", "scp", "ssh", "ssh"]

  usage = _bash(os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "bogus")
  assert usage.returncode == 2 and "usage" in usage.stderr


def _remote_of(words):
  return [w for w in words if w.startswith("--command=")][0][len("--command="):]


def _remote(proc):
  return _remote_of(_last_command(proc))


def _fake_tools(tmp_path, **scripts):
  """A PATH directory of bash stand-ins (e.g. srun, scontrol, gcloud) that log their calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, body in scripts.items():
    tool = bin_dir / name
    tool.write_text(f"#!/usr/bin/env bash\necho \"{name} $*\" >> {tmp_path}/calls\n{body}\n")
    tool.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_slurm_reruns_srun_after_host_loss_and_requeues_after_preemption(tmp_path):
  # srun fails as after a host loss (75), then a task killed by a signal (137), then the job
  # is preempted (143 after its checkpoint): two restarts in the allocation, then a requeue.
  runs = tmp_path / "runs"
  env = _fake_tools(tmp_path, scontrol="",
                    srun=f"n=$(( $(cat {runs} 2>/dev/null || echo 0) + 1 )); echo $n > {runs}\n"
                         "case $n in 1) exit 75;; 2) exit 137;; *) exit 143;; esac")
  env.update(SLURM_JOB_ID="77", BACKOFF="0", MAX_RESTARTS="3")
  proc = _bash(os.path.join(LAUNCH, "slurm_gpu.sbatch"), "configs/base.py", "/shared/run",
               env=env)
  assert proc.returncode == 143, proc.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert [c.split()[0] for c in calls] == ["srun", "srun", "srun", "scontrol"]
  assert calls[-1] == "scontrol requeue 77"
  assert "restart 2 of 3" in proc.stderr


def test_slurm_gives_up_after_max_restarts_and_not_on_errors(tmp_path):
  env = _fake_tools(tmp_path, scontrol="", srun="exit 75")
  env.update(SLURM_JOB_ID="77", BACKOFF="0", MAX_RESTARTS="2")
  proc = _bash(os.path.join(LAUNCH, "slurm_gpu.sbatch"), "configs/base.py", "/r", env=env)
  assert proc.returncode == 75 and "after 2 restarts: giving up" in proc.stderr
  assert (tmp_path / "calls").read_text().count("srun") == 3
  (tmp_path / "calls").unlink()
  env = _fake_tools(tmp_path, srun="exit 1")
  env.update(SLURM_JOB_ID="77", BACKOFF="0")
  proc = _bash(os.path.join(LAUNCH, "slurm_gpu.sbatch"), "configs/base.py", "/r", env=env)
  assert proc.returncode == 1 and (tmp_path / "calls").read_text().count("srun") == 1


def test_tpu_pod_run_is_detached_and_status_logs_stop_work(tmp_path):
  """One stand-in worker: `gcloud ... ssh --command=C` runs C in a fake home holding the
  checkout's supervisor and a stand-in trainer that runs until SIGTERM, then exits 143."""
  home = tmp_path / "home"
  (home / "audiomaepp" / "launch").mkdir(parents=True)
  (home / "audiomaepp" / ".venv" / "bin").mkdir(parents=True)
  supervise = home / "audiomaepp" / "launch" / "supervise.sh"
  supervise.write_text(open(os.path.join(LAUNCH, "supervise.sh")).read())
  supervise.chmod(0o755)
  trainer = home / "audiomaepp" / ".venv" / "bin" / "python"
  trainer.write_text("#!/usr/bin/env bash\necho \"training $*\"\n"
                     "trap 'echo checkpointed; exit 143' TERM\nwhile true; do sleep 0.05; done\n")
  trainer.chmod(0o755)
  env = _fake_tools(tmp_path, gcloud=(
      'for a in "$@"; do [[ $a == --command=* ]] && command=${a#--command=}; done\n'
      f'cd {home} && HOME={home} bash -c "$command"'))
  env["TPU_NAME"] = "pod"
  tpu = lambda *args: _bash(os.path.join(LAUNCH, "tpu_pod.sh"), *args, env=env)
  log = home / "audiomaepp" / "logs" / f"{os.uname().nodename}.log"

  def wait_for(predicate):
    for _ in range(200):
      if predicate():
        return True
      subprocess.run(["sleep", "0.05"], check=True)
    return False

  try:
    assert tpu("run", "configs/base.py", "gs://b/r", "--config.seed=3").returncode == 0
    assert wait_for(lambda: log.exists() and "training" in log.read_text())
    assert ("training main.py --distributed --config=configs/base.py --workdir=gs://b/r "
            "--config.seed=3") in log.read_text()
    status = tpu("status")
    assert f"{os.uname().nodename}: running | training main.py" in status.stdout, status.stderr
    assert "training main.py" in tpu("logs").stdout
    assert tpu("stop").returncode == 0
    assert wait_for(lambda: "stopped" in tpu("status").stdout)
    assert "checkpointed" in log.read_text()
    assert "supervise: stopped by a signal; the command exited with status 143" in log.read_text()
  finally:
    pid_file = home / "audiomaepp" / "logs" / "supervise.pid"
    pid = pid_file.read_text().strip() if pid_file.exists() else ""
    # Only the stand-in supervisor's own session, never a group the pid does not lead.
    try:
      if pid.isdigit() and os.getsid(int(pid)) == int(pid):
        os.killpg(int(pid), signal.SIGKILL)
    except ProcessLookupError:
      pass
