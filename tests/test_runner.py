"""The runner's guarantees, for both of its tasks (pretraining and fine-tuning): a bug inside a
restore keeps its traceback, a failing close keeps the error that ended the run, a bad config is
one line that writes nothing, and (slow) two processes with FSDP-sharded state survive kill -9
of one host and a damaged newest checkpoint, resuming to the losses of an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from audiomaepp import checkpointing
from audiomaepp import metrics
from audiomaepp.errors import UserError
from audiomaepp.train import finetune
from audiomaepp.train import pretrain
from conftest import experiment_config
import faults
import finetune_tasks
import main_runs

pytestmark = pytest.mark.integration

TASKS = ("pretrain", "finetune")
HOST_LOST = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Pretraining shards of four tones; a fine-tuning task folder; a pretrained workdir."""
  root = tmp_path_factory.mktemp("runner")
  faults.write_tone_shards(root)
  finetune_tasks.write_tone_task(root, multilabel=True)
  finetune_tasks.write_pretrained(root / "pre")
  return root


def _config(kind, data, steps=2):
  """A run of `steps` steps of the tiny model, checkpointed at the end."""
  if kind == "pretrain":
    config = experiment_config("demo")
    config.data.source, config.data.data_dir = "tfds", str(data / "shards")
    config.model.width, config.model.num_heads, config.model.depth = 32, 2, 1
    config.model.decoder_width, config.model.decoder_depth = 32, 1
    config.batch_size, config.eval_batches = 4, 0
  else:
    config = finetune_tasks.tiny_finetune_config(data / "tones-v1", init_from=str(data / "pre"))
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = steps
  return config


def _run(kind, config, workdir):
  return (pretrain if kind == "pretrain" else finetune).run(config, str(workdir))


@pytest.mark.parametrize("kind", TASKS)
def test_a_bug_raised_inside_a_restore_keeps_its_traceback(kind, data, tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  _run(kind, _config(kind, data), workdir)
  before = sorted(os.listdir(workdir / checkpointing.CHECKPOINT_DIR))

  def buggy(self, step, *args, **kwargs):
    raise AttributeError("'NoneType' object has no attribute 'shape'")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", buggy)
  with pytest.raises(AttributeError, match="has no attribute 'shape'") as error:
    _run(kind, _config(kind, data, steps=4), workdir)
  assert not isinstance(error.value, UserError)
  assert any(frame.name == "buggy" for frame in error.traceback)  # its own traceback
  assert sorted(os.listdir(workdir / checkpointing.CHECKPOINT_DIR)) == before
  assert not (workdir / checkpointing.SKIPPED_DIR).exists()  # nothing moved aside


@pytest.mark.parametrize("kind", TASKS)
def test_a_failing_close_keeps_the_error_that_ended_the_run(kind, data, tmp_path, monkeypatch,
                                                           caplog):
  task_class = pretrain.PretrainTask if kind == "pretrain" else finetune.FinetuneTask

  def broken_input(self, start_step, block):
    raise RuntimeError("the input pipeline broke")

  def full_disk(self):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(task_class, "train_batches", broken_input)
  monkeypatch.setattr(metrics.MetricsWriter, "close", full_disk)
  with pytest.raises(RuntimeError, match="the input pipeline broke"):
    _run(kind, _config(kind, data), tmp_path / "w")
  assert "cleanup (" in caplog.text and "failed too" in caplog.text
  monkeypatch.undo()


@pytest.mark.parametrize("kind,flags", [
    ("pretrain", ["--config=configs/demo.py", "--config.log_every_steps=0"]),
    ("finetune", ["--config=configs/finetune_demo.py", "--config.finetune.mixup=-1",
                  "--config.data.task_dir=TASK"]),
])
def test_a_bad_config_is_one_line_and_writes_nothing(kind, flags, data, tmp_path):
  workdir = tmp_path / "w"
  flags = [flag.replace("TASK", str(data / "tones-v1")) for flag in flags]
  done = subprocess.run([sys.executable, "main.py", *flags, f"--workdir={workdir}"],
                        cwd=main_runs.REPO, env=main_runs.fast_env(tmp_path / "cache"),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  expected = ("config.log_every_steps=0: expected a positive integer" if kind == "pretrain"
              else "config.finetune.mixup=-1.0 is out of range")
  assert errors == [f"error: {expected}"], done.stderr[-2000:]
  assert not workdir.exists()


# Two processes of one device each, the parameters sharded over both (FSDP).
STEPS, EVERY = 12, 3
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.shard_params=True")


def _command(kind, data, workdir):
  if kind == "pretrain":
    return [sys.executable, "main.py", *main_runs.shrunk_demo(STEPS, checkpoint_every=EVERY),
            f"--workdir={workdir}", *FSDP]
  return [*finetune_tasks.finetune_command(workdir, data / "tones-v1", data / "pre", STEPS,
                                           EVERY), *FSDP]


def _start_pair(command, env):
  port = main_runs.free_port()
  return [subprocess.Popen(
      [*command, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=main_runs.REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]


def _losses(workdir):
  path = pathlib.Path(workdir) / metrics.METRICS_FILE
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(str(path))
          if r["split"] == "train"} if path.exists() else {}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("kind", TASKS)
def test_two_fsdp_hosts_survive_kill9_and_a_damaged_newest_step(kind, data, tmp_path):
  """kill -9 of host 1 after checkpoint 6; the survivor reports and exits 75; the newest
  complete checkpoint is then damaged; both hosts restart, skip it and resume from the one
  before: every step's loss equals the uninterrupted run's, bit for bit."""
  env = main_runs.fast_env(tmp_path / "cache", devices=1)
  reference = tmp_path / "reference"
  codes, outputs = main_runs.finish(_start_pair(_command(kind, data, reference), env))
  assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))

  workdir = tmp_path / "w"
  procs = _start_pair(_command(kind, data, workdir), env)
  deadline = time.time() + 400
  while (checkpointing.latest_complete_step(workdir) or 0) < 2 * EVERY or max(
      _losses(workdir), default=0) <= 2 * EVERY:
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      main_runs.finish(procs, timeout=1)
      pytest.fail("a process ended or stalled before the kill")
    time.sleep(0.02)
  os.killpg(procs[1].pid, signal.SIGKILL)
  codes, outputs = main_runs.finish(procs, timeout=60)
  assert codes[0] == HOST_LOST, outputs[0][-2000:]
  newest = checkpointing.latest_complete_step(workdir)
  assert newest is not None and 2 * EVERY <= newest < STEPS
  faults.truncate_checkpoint_arrays(workdir / checkpointing.CHECKPOINT_DIR / str(newest))

  codes, outputs = main_runs.finish(_start_pair(_command(kind, data, workdir), env))
  assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
  for output in outputs:  # the same decision on both hosts
    assert f"checkpoint step {newest} cannot be restored, skipping it" in output
    assert f"resumed from checkpoint step {newest - EVERY}" in output
  assert os.listdir(workdir / checkpointing.SKIPPED_DIR) == [str(newest)]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([losses[s] for s in sorted(losses)],
                                [expected[s] for s in sorted(losses)])
