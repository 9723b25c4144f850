"""Launch scripts: bash syntax and dry runs (nothing is started)."""
import os
import shlex
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ("local.sh", "slurm_gpu.sbatch", "tpu_pod.sh")


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


def test_tpu_pod_dry_run_commands():
  env = {"TPU_NAME": "pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-64",
         "PROJECT": "proj"}
  create = _last_command(_bash(os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "create",
                               env=env))
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert "--accelerator-type=v4-64" in create and "--project=proj" in create
  run = _last_command(_bash(os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "run",
                            "configs/base.py", "/gcs/runs/base", "--config.seed=3", env=env))
  assert run[4:6] == ["ssh", "pod"] and "--worker=all" in run
  remote = [w for w in run if w.startswith("--command=")][0]
  assert ("main.py --distributed --config=configs/base.py --workdir=/gcs/runs/base "
          "--config.seed=3") in remote
  usage = _bash(os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "bogus")
  assert usage.returncode == 2 and "usage" in usage.stderr
