"""benchmarks/study.py: the log-mel baseline, the goals and the report (no training here)."""

import numpy as np
import pytest

from audiomaepp import audio
from audiomaepp.evaluation import baselines
from audiomaepp import models
import conftest
from conftest import experiment_config
TASKS = ["kws-v1", "pitch-v1"]


@pytest.fixture(scope="module")
def study():
  with conftest.benchmark_module("study") as module:
    yield module


def _results(rows):
  return {row: {t: {"mean": m, "ci": 1.5} for t, m in zip(TASKS, means)}
          for row, means in rows.items()}


def test_logmel_baseline_is_per_bin_mean_and_std():
  t = np.arange(32000) / 16000
  waveform = (0.5 * np.sin(2 * np.pi * 1000 * t) * (t < 1)).astype(np.float32)  # 1 s tone, 1 s silence
  stats = baselines.logmel_stats(waveform[None])[0]
  assert stats.shape == (160,) and stats.dtype == np.float32
  logmel = audio.log_mel(waveform)
  np.testing.assert_allclose(stats, np.concatenate([logmel.mean(0), logmel.std(0)]), rtol=1e-5)
  # Independent reference: the tone's mel bin (HTK mel, 80 bins, 50-8000 Hz) has the highest
  # mean and, on for half the clip, the largest spread over time.
  mel = lambda f: 2595 * np.log10(1 + f / 700)
  tone_bin = int(np.argmin(np.abs(np.linspace(mel(50), mel(8000), 82)[1:-1] - mel(1000))))
  assert abs(int(np.argmax(stats[:80])) - tone_bin) <= 1
  assert abs(int(np.argmax(stats[80:])) - tone_bin) <= 1


def test_goals_are_judged_per_task(study):
  results = _results({"AudioMAE++": (60, 30), "MAE": (50, 35),
                      "AudioMAE++ (random init)": (40, 32), study.LOGMEL: (55, 50)})
  verdicts = {goal: ok for goal, ok, _ in study.goals(results, TASKS)}
  assert verdicts == {
      "pretrained > random init on every task": False,  # AudioMAE++ 30 < 32 on pitch
      "AudioMAE++ >= MAE": False,  # 30 < 35 on pitch
      "pretrained > log-mel baseline on at least one task": True,  # 60 > 55 on kws
  }


def test_report_has_every_row_and_keeps_the_notes(study, tmp_path):
  results = _results({"AudioMAE++": (60, 40), "MAE": (50, 35),
                      "AudioMAE++ (random init)": (40, 30), study.LOGMEL: (55, 50)})
  output = tmp_path / "results.md"
  output.write_text(f"old table\n{study.NOTES_MARKER}\n\nhand-written reading\n")
  config = experiment_config("study")
  setup = {"config": config, "per_class": 30, "seeds": 10, "trend_seeds": 3, "order": "heareval",
           "command": "python benchmarks/study.py --workdir=w",
           "params": {"AudioMAE++": models.parameter_counts(config.model),
                      "MAE": models.parameter_counts(experiment_config("study").model)}}
  env = {"device_kind": "cpu", "device_count": 1, "platform": "cpu", "host_cpus": 2,
         "load_average": [1.0, 1.0, 1.0], "jax": "x", "date_utc": "today"}
  curves = {"AudioMAE++": [{"step": 10, "split": "train", "loss": 0.9},
                           {"step": 10, "split": "eval", "loss": 0.8}], "MAE": []}
  trend = {"AudioMAE++ @ step 1000": results["AudioMAE++"], "MAE @ step 100": results["MAE"],
           "AudioMAE++ @ step 100": results["MAE"]}
  checks = {row: {t: {"linear": 70.0, "rank": 12.34, "dim": 480} for t in TASKS} for row in results}
  study.write_report(output, results, trend, checks, TASKS, curves, setup,
                     {"tasks": 30.0, "x": 90.0}, env)
  text = output.read_text()
  assert "old table" not in text and text.endswith("hand-written reading\n")
  assert "Wall time: 2.0 min" in text
  assert "`audiomaepp.tools.evaluate --order=heareval`, 10 seeds" in text
  # s(m) over the four rows: AudioMAE++ is the best on kws (1) and halfway on pitch (10 / 20).
  assert "| AudioMAE++ | 60.0 ± 1.5 | 40.0 ± 1.5 | 75.0 |" in text
  assert "| log-mel mean+std | 55.0 ± 1.5 | 50.0 ± 1.5 | 87.5 |" in text
  assert "| AudioMAE++ @ step 100 | 50.0 ± 1.5 | 35.0 ± 1.5 |" in text
  rows = [line.split(" |")[0] for line in text.splitlines() if " @ step " in line]
  assert rows == ["| AudioMAE++ @ step 100", "| AudioMAE++ @ step 1000", "| MAE @ step 100"]
  assert "AudioMAE++ 0.900 / 0.800" in text
  assert "| MAE | 70.0 | 12.3 / 480 | 70.0 | 12.3 / 480 |" in text


def test_representation_checks_on_known_embeddings(study, tmp_path):
  from audiomaepp.evaluation import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  metadata = {"task_name": "toy", "prediction_type": "multiclass", "splits": ["train", "valid", "test"],
              "split_mode": "trainvaltest", "evaluation": ["top1_acc"], "embedding_type": "scene"}
  splits = {}
  for split, n in (("train", 64), ("valid", 16), ("test", 16)):
    labels = np.arange(n) % 4
    # Four separable classes along 4 of the 8 dims (one-hot rows plus a little noise).
    x = np.zeros((n, 8), np.float32)
    x[np.arange(n), labels] = 1.0
    splits[split] = (x + 1e-4 * rng.standard_normal((n, 8)).astype(np.float32),
                     [[str(l)] for l in labels], [f"{split}{i}.wav" for i in range(n)])
  task_dir = tasks_lib.write_task_embeddings(tmp_path, "toy", metadata, ["0", "1", "2", "3"], splits)
  checks = study.representation_checks(task_dir)
  assert checks["linear"] == 100.0 and checks["dim"] == 8
  # Centred one-hot rows of 4 balanced classes span 3 directions with equal singular values.
  assert checks["rank"] == pytest.approx(3.0, rel=0.01)


def test_rows_not_evaluated_yet_are_pending(study):
  results = _results({"AudioMAE++": (60, 40), "MAE": (50, 35),
                      "AudioMAE++ (random init)": (40, 30), study.LOGMEL: (55, 50)})
  results["MAE"]["pitch-v1"] = None
  assert all(ok is None for _, ok, _ in study.goals(results, TASKS))
  table = study.score_table(results, TASKS)
  assert "| MAE | 50.0 ± 1.5 | pending | pending |" in table
  # s(m) over the three complete rows: AudioMAE++ best on kws, (40 - 30) / 20 on pitch.
  assert "| AudioMAE++ | 60.0 ± 1.5 | 40.0 ± 1.5 | 75.0 |" in table
