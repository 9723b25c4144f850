"""The evaluate CLI end to end, and the report (reference rows, table, chart)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from audiomaepp import audio
from audiomaepp.evaluation import report
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BO = "beijing_opera-v1.0-hear2021-full"  # a HEAR name, so the paper's BO column matches it


def _logmel_segment_means(path, segments=4):
  """A simple real embedding: means of the log-mel over `segments` time segments."""
  logmel = audio.log_mel(audio.load_audio(path))
  return np.concatenate([s.mean(0) for s in np.array_split(logmel, segments)])


@pytest.fixture(scope="module")
def embeddings_dir(hear_suite_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("embeddings")
  kws = tasks.read_hear_task(hear_suite_dir / "kws-v1")
  tasks.write_task_embeddings(out, "kws-v1", kws.metadata, kws.vocabulary, {
      name: (np.stack([_logmel_segment_means(p) for p in s.paths]), s.labels, s.files)
      for name, s in kws.splits.items()})
  # A fold-based task from class means, named like HEAR's Beijing Opera task.
  rng = np.random.default_rng(0)
  vocabulary = ["bangu", "daluo", "naobo", "xiaoluo"]
  means = 3 * rng.standard_normal((4, 24))
  splits = {}
  for fold in ("fold00", "fold01", "fold02"):
    labels = rng.integers(0, 4, 20)
    x = (means[labels] + rng.standard_normal((20, 24))).astype(np.float32)
    splits[fold] = (x, [[vocabulary[k]] for k in labels], [f"{fold}_{i}.wav" for i in range(20)])
  metadata = {"task_name": "beijing_opera", "splits": list(splits), "split_mode": "new_split_kfold",
              "embedding_type": "scene", "prediction_type": "multiclass",
              "evaluation": ["top1_acc"]}
  tasks.write_task_embeddings(out, BO, metadata, vocabulary, splits)
  return out


def _evaluate(*flags):
  return subprocess.run([sys.executable, "-m", "audiomaepp.tools.evaluate", *flags],
                        capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_and_resume(embeddings_dir, tmp_path):
  out = tmp_path / "eval"
  flags = [f"--embeddings_dir={embeddings_dir}", "--seeds=3", "--max_epochs=30",
           "--reference=paper", f"--output_dir={out}", "--model_name=tiny"]
  done = _evaluate(*flags)
  assert done.returncode == 0, done.stderr
  assert f"[1/2] {BO}: multiclass, 4 classes, 3 splits, 3 seeds x 2 grid points" in done.stderr

  result = json.loads((out / "scores.json").read_text())
  assert sorted(result["tasks"]) == [BO, "kws-v1"]
  for task in result["tasks"].values():
    assert len(task["seed_scores"]) == 3 and set(task["grid_choice"]) <= {0.1, 0.25}
    mean = np.mean(task["seed_scores"])
    low, high = scipy.stats.t.interval(0.95, 2, mean, scipy.stats.sem(task["seed_scores"]))
    assert task["mean"] == pytest.approx(mean) and task["ci"] == pytest.approx((high - low) / 2)
    assert all(e <= 30 for run in task["runs"] for row in run["epochs"] for e in row)
  test_folds = [run["test"] for run in result["tasks"][BO]["runs"]]
  assert test_folds == [["fold00"], ["fold01"], ["fold02"]]
  # The normalised score is computed on the task the paper shares, over its 20 rows and this one.
  score = result["normalized_score"]
  assert score["tasks"] == [BO] and len(score["models"]) == 21
  column = [m["scores"]["BO"]["mean"] for m in report.paper_table2()["models"]]
  x = result["tasks"][BO]["mean"]
  low, high = min(column + [x]), max(column + [x])
  assert score["models"]["tiny"] == pytest.approx(100 * (x - low) / (high - low))

  table = (out / "results.md").read_text()
  assert table.splitlines()[0] == "| Model | BO | kws-v1 | s(m) |"
  assert "| AudioMAE++-Large | 94.1±0.4 | – |" in table
  assert f"| **tiny** | {x:.1f}±" in table and table in done.stdout
  assert (out / "scores.png").read_bytes().startswith(PNG_SIGNATURE)

  again = _evaluate(*flags)
  assert again.returncode == 0, again.stderr
  assert again.stderr.count("reusing") == 2
  assert json.loads((out / "scores.json").read_text())["tasks"] == result["tasks"]


def test_cli_reports_unknown_tasks(embeddings_dir, tmp_path):
  done = _evaluate(f"--embeddings_dir={embeddings_dir}", "--tasks=esc50",
                   f"--output_dir={tmp_path}")
  assert done.returncode != 0
  assert "no complete task folders ['esc50']" in done.stderr


def _task_result(mean, ci=1.0):
  return {"mean": mean, "ci": ci, "metric": "top1_acc", "runs": [{}], "seeds": [0, 1],
          "grid_choice": [0.1, 0.25], "wall_time_s": 1.0}


def test_report_against_an_earlier_scores_json(tmp_path):
  earlier = report.build_report("old", {"a-v1": _task_result(60.0), "b-v1": _task_result(20.0)})
  assert earlier["normalized_score"]["models"] == {"old": None}  # one model: undefined
  path = tmp_path / "scores.json"
  path.write_text(json.dumps(earlier))
  new = report.build_report("new", {"a-v1": _task_result(80.0), "b-v1": _task_result(10.0),
                                    "c-v1": _task_result(50.0)}, [report.load_reference(str(path))])
  # Shared tasks a, b: new is best on a (1) and worst on b (0); old the reverse.
  assert new["normalized_score"]["tasks"] == ["a-v1", "b-v1"]
  assert new["normalized_score"]["models"] == pytest.approx({"new": 50.0, "old": 50.0})
  table = report.results_markdown(new)
  assert "| old | 60.0±1.0 | 20.0±1.0 | – | 50.0 |" in table
  assert "| **new** | 80.0±1.0 | 10.0±1.0 | 50.0±1.0 | 50.0 |" in table
  report.bar_chart(new, tmp_path / "chart.png")
  assert (tmp_path / "chart.png").read_bytes().startswith(PNG_SIGNATURE)


def test_paper_reference_matches_hear_names_and_keeps_published_names_apart():
  ref = report.load_reference("paper")
  assert ref.column("speech_commands-v0.0.2-5h") == "SC-5h"
  assert ref.column("tfds_crema_d") == "CD" and ref.column("F50K") == "F50K"
  # Evaluating a model under a published name keeps both rows.
  results = {"esc50-v2.0.0-full": _task_result(90.0)}
  built = report.build_report("AudioMAE++-Base", results, [ref])
  assert "AudioMAE++-Base (paper Table 2)" in built["reference_rows"]
  e50 = [m["scores"]["E50"]["mean"] for m in report.paper_table2()["models"]]
  expected = scores.normalized_scores(
      {**{str(i): {"t": v} for i, v in enumerate(e50)}, "x": {"t": 90.0}}, ["t"])["x"]
  assert built["normalized_score"]["models"]["AudioMAE++-Base"] == pytest.approx(expected)


def test_reference_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="reference file not found"):
    report.load_reference(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"rows": []}))
  with pytest.raises(ValueError, match="expected a Table-2-style JSON"):
    report.load_reference(str(bad))
