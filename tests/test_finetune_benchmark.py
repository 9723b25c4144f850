"""benchmarks/finetune.py: the recipe cut to a step budget and the HEAR probe row it reads (no
training here; the runs themselves are the fine-tuning tests')."""
import json
import os
import subprocess
import sys

import pytest

from audiomaepp import experiment
from audiomaepp.train import optim
import conftest


@pytest.fixture(scope="module")
def bench():
  with conftest.benchmark_module("finetune") as module:
    yield module


def test_a_recipe_cut_to_a_step_budget_keeps_its_schedule_shape(bench):
  config = experiment.load_config(conftest.CONFIGS / "finetune_small.py", "study")
  # 40 epochs of 600 clips, 37 full batches of 16 each; 5 of them warm up.
  assert optim.total_train_steps(config, 600) == 1480
  bench.cut_to(config, 600, 450)
  assert optim.total_train_steps(config, 600) == 450
  assert config.warmup_epochs * 37 / 450 == pytest.approx(5 / 40)
  short = experiment.load_config(conftest.CONFIGS / "finetune_small.py", "study")
  bench.cut_to(short, 160, 450)  # 400 steps: left as it is
  assert (optim.total_train_steps(short, 160), short.warmup_epochs) == (400, 5)


def test_the_probe_row_reads_the_cached_scores_with_the_most_seeds(bench, tmp_path):
  for seeds in (3, 5):
    (tmp_path / f"kws-v1-{seeds}seeds-heareval.json").write_text(
        json.dumps({"seed_scores": [float(s) for s in range(seeds)]}))
  (tmp_path / "kws-v2-10seeds-heareval.json").write_text(json.dumps({"seed_scores": [9.0] * 10}))
  assert bench.probe_scores(tmp_path, "kws-v1") == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert bench.probe_scores(tmp_path, "pitch-v1") == []


def test_steps_and_max_steps_together_are_refused_before_anything_runs(tmp_path):
  run = subprocess.run([sys.executable, "benchmarks/finetune.py", f"--workdir={tmp_path}",
                        "--steps=10", "--max_steps=20"], cwd=conftest.CONFIGS.parent,
                       env={**os.environ, "PYTHONPATH": str(conftest.CONFIGS.parent)},
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert "steps" in run.stderr and "max_steps" in run.stderr
  assert list(tmp_path.iterdir()) == []
