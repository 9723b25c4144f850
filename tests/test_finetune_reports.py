"""What a fine-tuning run reports: a progress line per log step (the runner's, shared with
pretraining), validation curves in TensorBoard, and the best checkpoint's scores in
WORKDIR/summary.json and the last console lines."""
import json
import logging
import os
import re

import pytest

from audiomaepp import metrics
from audiomaepp.train import finetune

import finetune_tasks
import test_train_metrics

STEPS, EVERY, LOG_EVERY = 6, 2, 3


class _Lines(logging.Handler):
  """Collects the messages this package logs through absl (not Orbax's)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    if f"{os.sep}audiomaepp{os.sep}" in record.pathname:
      self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny single-label fine-tuning run: (workdir, its console lines, its metrics records)."""
  root = tmp_path_factory.mktemp("reports")
  task_dir = finetune_tasks.write_tone_task(root)
  config = finetune_tasks.tiny_finetune_config(task_dir, steps=STEPS, every=EVERY)
  config.log_every_steps = LOG_EVERY
  workdir = root / "ft"
  logger, handler = logging.getLogger("absl"), _Lines()
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    finetune.run(config, str(workdir))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return workdir, handler.lines, metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))


def test_progress_names_the_step_of_the_total():
  assert metrics.progress(250, 1000) == "250/1000 25.0%"
  assert metrics.progress(7, None) == "7"


@pytest.mark.integration
def test_each_log_step_prints_step_total_percent_loss_rate_and_eta(run):
  _, lines, _ = run
  progress = [re.match(r"\[train (\d+)/(\d+) ([\d.]+)%\] loss=[\d.]+, .*samples_per_sec=[\d.]+, "
                       r"eta_s=\d+:\d\d:\d\d$", line) for line in lines if line.startswith("[train")]
  assert all(progress), [line for line in lines if line.startswith("[train")]
  assert [(int(m[1]), int(m[2]), float(m[3])) for m in progress] == [(3, 6, 50.0), (6, 6, 100.0)]
  assert [line.split("]")[0] for line in lines if line.startswith("[eval")] == [
      "[eval 2/6 33.3%", "[eval 4/6 66.7%", "[eval 6/6 100.0%"]


@pytest.mark.integration
def test_validation_curve_is_in_tensorboard_under_eval(run):
  workdir, _, records = run
  scalars = test_train_metrics._read_tensorboard_scalars(  # pylint: disable=protected-access
      str(workdir / metrics.TENSORBOARD_DIR))
  logged = [(r["step"], r["top1_acc"]) for r in records if r["split"] == "eval"]
  assert [s for s, _ in logged] == [2, 4, 6]
  assert scalars["eval/top1_acc"] == [(s, pytest.approx(v)) for s, v in logged]
  test = [r for r in records if r["split"] == "test"]
  assert scalars["test/top1_acc"] == [(STEPS, pytest.approx(test[0]["top1_acc"]))]


@pytest.mark.integration
def test_summary_holds_the_best_step_its_validation_and_test_scores(run):
  workdir, lines, records = run
  summary = json.loads((workdir / finetune.SUMMARY_FILE).read_text())
  evals = [r for r in records if r["split"] == "eval"]
  best = max(evals, key=lambda r: r["top1_acc"])  # the first of equal scores: later ones do not
  test = [r for r in records if r["split"] == "test"][0]
  assert summary == {"task": "tones-v1", "metric": "top1_acc", "steps": STEPS,
                     "best_step": best["step"], "eval_split": "valid",
                     "eval_score": pytest.approx(best["top1_acc"]), "test_split": "test",
                     "test_score": pytest.approx(test["top1_acc"])}
  # The test score is the best checkpoint's, scored again from its files.
  rescored = finetune.score_workdir(str(workdir))
  assert rescored["score"] == pytest.approx(summary["test_score"]) and rescored["eval_crops"] == 1
  assert finetune.score_workdir(str(workdir), eval_crops=3)["eval_crops"] == 3
  with pytest.raises(finetune.ConfigError, match=r"^eval_crops=0: expected 1 or more crops per "
                     r"clip$"):
    finetune.score_workdir(str(workdir), eval_crops=0)
  last = lines[-2:]
  assert last[0] == (f"best checkpoint: step {best['step']} of {STEPS}, valid top1_acc "
                     f"{best['top1_acc']:.4f}, test top1_acc {test['top1_acc']:.4f} "
                     f"({workdir / finetune.SUMMARY_FILE})")
  assert last[1].startswith(f"done: step {STEPS}")
