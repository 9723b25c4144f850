"""Fine-tuning end to end through main.py: kill -9 and resume gives the losses of an
uninterrupted run bit for bit; the best checkpoint is kept beside the latest."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from audiomaepp import checkpointing
from audiomaepp import metrics
from audiomaepp.train import finetune

import finetune_tasks
import main_runs

pytestmark = pytest.mark.integration

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune_runs")
  task_dir = finetune_tasks.write_tone_task(root, multilabel=True)
  finetune_tasks.write_pretrained(root / "pre")
  return root, task_dir


def _command(workdir, task_dir, pretrained):
  """Scored with two crops per clip, so that resuming, rescoring and two hosts cover them."""
  return [*finetune_tasks.finetune_command(workdir, task_dir, pretrained, STEPS, EVERY),
          "--config.data.eval_crops=2"]


def _losses(workdir):
  path = workdir / metrics.METRICS_FILE
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(str(path))
          if r["split"] == "train"} if path.exists() else {}


def _run(command, env, timeout=300):
  """`command` in the repository, its output captured as text."""
  return subprocess.run(command, cwd=main_runs.REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _records(workdir, split):
  return [r for r in metrics.read_jsonl(str(workdir / metrics.METRICS_FILE)) if r["split"] == split]


@pytest.mark.timeout(600)
def test_kill9_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
  root, task_dir = setup
  env = main_runs.fast_env(tmp_path / "cache")
  reference = tmp_path / "reference"
  done = _run(_command(reference, task_dir, root / "pre"), env)
  assert done.returncode == 0, done.stderr[-3000:]
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert len(_records(reference, "eval")) == STEPS // EVERY
  assert len(_records(reference, "test")) == 1
  assert "mAP" in _records(reference, "test")[0] and "ap/0" in _records(reference, "eval")[0]
  best_dirs = os.listdir(reference / "best")
  assert [d for d in best_dirs if d.isdigit()]  # the best step, beside checkpoints/

  workdir = tmp_path / "killed"
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(_command(workdir, task_dir, root / "pre"), cwd=main_runs.REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.time() + 240
  while (checkpointing.latest_complete_step(workdir) or 0) < EVERY or max(
      _losses(workdir), default=0) <= EVERY:
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(workdir))
  assert killed_at < STEPS, "the run ended before the kill"
  logged = dict(_losses(workdir))

  done = _run(_command(workdir, task_dir, root / "pre"), env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from checkpoint step" in done.stderr
  resumed = _losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))  # each step once
  assert resumed == expected  # bit for bit
  assert all(expected[s] == loss for s, loss in logged.items())
  assert _records(workdir, "test") == _records(reference, "test")


@pytest.mark.timeout(300)
def test_resume_with_another_number_of_classes_is_one_line(setup, tmp_path):
  root, task_dir = setup
  env = main_runs.fast_env(tmp_path / "cache")
  workdir = tmp_path / "ft"
  command = _command(workdir, task_dir, root / "pre")
  command = [c.replace(f"num_train_steps={STEPS}", f"num_train_steps={EVERY}") for c in command]
  assert _run(command, env).returncode == 0
  other = finetune_tasks.write_tone_task(tmp_path, name="five-v1", classes=5, per_class=2)
  record = (workdir / checkpointing.CONFIG_FILE).read_text()
  command = [c.replace(str(task_dir), str(other)) for c in command]
  done = _run(command, env)
  assert done.returncode == 1
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "has 3 classes, the task has 5" in errors[0], done.stderr[-2000:]
  assert (workdir / checkpointing.CONFIG_FILE).read_text() == record
  assert json.loads(record)["num_classes_resolved"] == 3


@pytest.mark.timeout(300)
def test_evaluate_finetuned_scores_the_best_checkpoint_as_the_run_did(setup, tmp_path):
  root, task_dir = setup
  env = main_runs.fast_env(tmp_path / "cache")
  workdir = tmp_path / "ft"
  done = _run(_command(workdir, task_dir, root / "pre"), env)
  assert done.returncode == 0, done.stderr[-3000:]
  logged = _records(workdir, "test")[0]
  result = finetune.score_workdir(str(workdir))
  assert result["eval_crops"] == 2
  assert result["mAP"] == pytest.approx(logged["mAP"], abs=1e-6)
  assert result["per_class_ap"] == pytest.approx([logged[f"ap/{i}"] for i in range(3)], abs=1e-6)
  command = [sys.executable, "-m", "audiomaepp.tools.evaluate_finetuned", f"--workdir={workdir}"]
  done = _run(command, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"| {100 * logged['mAP']:.1f} |" in done.stdout
  done = _run([*command[:-1], f"--workdir={root / 'pre'}"], env)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].endswith("is not a fine-tuning workdir (its "
                                                       "config.json has no task='finetune')")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("frozen", [False, True])
def test_two_hosts_with_sharded_parameters_match_one_host(setup, tmp_path, frozen):
  """The same fine-tuning on one process with two devices (data parallel) and on two processes
  of one device each with the parameters sharded over both (FSDP): the same batches, so the
  same losses and validation scores within float32 rounding; also with the encoder frozen
  (the head's gradient only)."""
  root, task_dir = setup
  freeze = ["--config.finetune.freeze_encoder=True", "--config.finetune.drop_path=0"] if frozen \
      else []
  command = lambda workdir: [
      c.replace(f"num_train_steps={STEPS}", f"num_train_steps={EVERY}")
      for c in _command(workdir, task_dir, root / "pre")] + freeze
  one = tmp_path / "one"
  done = _run(command(one), main_runs.fast_env(tmp_path / "cache1", devices=2), timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  two, port = tmp_path / "two", main_runs.free_port()
  env = main_runs.fast_env(tmp_path / "cache2", devices=1)
  procs = [subprocess.Popen(
      [*command(two), "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.shard_params=True",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=main_runs.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  for workdir in (one, two):
    record = json.loads((workdir / checkpointing.CONFIG_FILE).read_text())
    assert record["finetune"]["freeze_encoder"] is frozen
  expected, got = _losses(one), _losses(two)
  assert sorted(got) == sorted(expected) == list(range(1, EVERY + 1))
  assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)],
                                                        rel=1e-5)
  assert _records(two, "eval")[0]["mAP"] == pytest.approx(_records(one, "eval")[0]["mAP"],
                                                          abs=1e-5)
