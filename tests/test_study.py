"""benchmarks/study.py: the log-mel baseline, the goals and the report (no training here)."""
import json

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


def _results(rows, tasks=TASKS):
  return {row: {t: {"mean": m, "ci": 1.5, "seed_scores": [m - 1, m, m + 1]}
                for t, m in zip(tasks, means)}
          for row, means in rows.items()}


def test_probe_agreement_counts_the_pairs_the_protocol_separates(study):
  results = {"a": {"t": {"mean": 60.0, "ci": 1.0}}, "b": {"t": {"mean": 50.0, "ci": 1.0}},
             "c": {"t": {"mean": 59.0, "ci": 1.0}}}  # a and c are within their intervals
  pairs = study.separated_pairs(results, ["a", "b", "c"], "t")
  assert pairs == [("a", "b"), ("b", "c")]
  protocol = {"a": 60.0, "b": 50.0, "c": 59.0}
  assert study.concordant(pairs, protocol, {"a": 70.0, "b": 40.0, "c": 90.0}) == 2
  assert study.concordant(pairs, protocol, {"a": 70.0, "b": 80.0, "c": 75.0}) == 0
  assert study.concordant(pairs, protocol, {"a": 30.0, "b": 40.0, "c": 50.0}) == 1


def test_the_protocols_agreement_with_itself_is_one_seed_against_the_others(study):
  same = {r: {"t": {"seed_scores": [m, m + 1, m + 2]}} for r, m in (("a", 1), ("b", 5), ("c", 9))}
  assert study.self_agreement(same, ["a", "b", "c"], "t") == pytest.approx(1.0)
  # Seed 0 reverses the order of three rows whose other seeds agree: its tau is -1, and
  # each other seed's against the mean of the rest (seed 0 included) is 1.
  mixed = {"a": {"t": {"seed_scores": [9, 1, 1, 1]}}, "b": {"t": {"seed_scores": [5, 5, 5, 5]}},
           "c": {"t": {"seed_scores": [1, 9, 9, 9]}}}
  assert study.self_agreement(mixed, ["a", "b", "c"], "t") == pytest.approx((-1 + 3) / 4)


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


def test_goals_are_judged_on_the_claimed_families_s_m_and_random_init(study):
  tasks = ["kws-v1", "pitch-v1", "env_sounds-v1", "language_id-v1"]
  rows = {"AudioMAE++": (60, 30, 70, 40), "MAE": (62, 35, 65, 30),
          "AudioMAE++ (random init)": (40, 40, 50, 20), study.LOGMEL: (55, 50, 45, 25)}
  results = {row: {t: {"mean": m, "ci": 1.0} for t, m in zip(tasks, means)}
             for row, means in rows.items()}
  verdicts = {goal: ok for goal, ok, _ in study.goals(results, tasks)}
  assert verdicts == {
      "AudioMAE++ > MAE on environmental sounds and on language identification": True,
      "s(m) of AudioMAE++ >= s(m) of MAE": True,  # recomputed independently below
      "pretrained > random init on every task but pitch": True,  # pitch 30 < 40 is exempt
  }
  low = {t: min(r[i] for r in rows.values()) for i, t in enumerate(tasks)}
  high = {t: max(r[i] for r in rows.values()) for i, t in enumerate(tasks)}
  s_m = {row: 100 * np.mean([(v - low[t]) / (high[t] - low[t]) for t, v in zip(tasks, means)])
         for row, means in rows.items()}
  assert s_m["AudioMAE++"] > s_m["MAE"]
  results["MAE"]["env_sounds-v1"]["mean"] = 75  # now MAE wins on environmental sounds
  results["AudioMAE++"]["kws-v1"]["mean"] = 39  # and AudioMAE++ is below random init on kws
  verdicts = {goal: ok for goal, ok, _ in study.goals(results, tasks)}
  assert not verdicts["AudioMAE++ > MAE on environmental sounds and on language identification"]
  assert not verdicts["pretrained > random init on every task but pitch"]


def test_the_paper_table_compares_signs_per_family(study):
  tasks = ["kws-v1", "env_sounds-v1"]
  results = _results({"AudioMAE++": (70, 60), "MAE": (72, 50),
                      "AudioMAE++ (random init)": (40, 30), study.LOGMEL: (55, 50)}, tasks)
  table = "\n".join(study.paper_table(results, tasks))
  assert "| keyword spotting | kws-v1 | -2.0 (-) | SpeechCommands 5h | -0.3 (74.0 vs 74.3) | yes |" \
      in table
  assert "| environmental sounds | env_sounds-v1 | +10.0 (+) | ESC-50 | +6.5 (76.6 vs 70.1) | yes |" \
      in table
  assert "| **s(m)** | all rows here |" in table and "(78.8 vs 77.6) | yes |" in table


def test_the_trend_is_the_gap_of_the_probes_at_each_budget(study):
  tasks = ["kws-v1", "pitch-v1"]
  records = {
      "AudioMAE++": [{"split": "probe", "step": 100, "kws-v1": 50.0, "pitch-v1": 20.0},
                     {"split": "probe", "step": 200, "kws-v1": 60.0, "pitch-v1": 40.0},
                     {"split": "train", "step": 200, "loss": 0.5}],
      "MAE": [{"split": "probe", "step": 100, "kws-v1": 40.0, "pitch-v1": 30.0},
              {"split": "probe", "step": 200, "kws-v1": 70.0, "pitch-v1": 40.0}],
  }
  points = study.trend(records, tasks, batch_size=16)
  assert [(p["step"], p["clips"]) for p in points] == [(100, 1600), (200, 3200)]
  assert points[0]["gaps"] == {"kws-v1": 10.0, "pitch-v1": -10.0}
  # s(m) over the four probe points: kws spans 40..70, pitch 20..40.
  expected = 100 * np.mean([(50 - 40) / 30, 0.0]) - 100 * np.mean([0.0, (30 - 20) / 20])
  assert points[0]["sm_gap"] == pytest.approx(expected)
  assert study.probe_overhead([{"split": "probe", "seconds": 5.0},
                               {"split": "probe", "seconds": 5.0}], 110.0) == pytest.approx(0.1)
  assert study.probe_overhead(records["MAE"], None) is None


def test_report_has_every_row_and_keeps_the_notes(study, tmp_path):
  results = _results({"AudioMAE++": (60, 40), "MAE": (50, 35),
                      "AudioMAE++ (random init)": (40, 30), study.LOGMEL: (55, 50)})
  output = tmp_path / "results.md"
  output.write_text(f"old table\n{study.NOTES_MARKER}\n\nhand-written reading\n")
  config = experiment_config("study")
  setup = {"config": config, "per_class": 30, "seeds": 10, "order": "heareval",
           "command": "python benchmarks/study.py --workdir=w",
           "params": {"AudioMAE++": models.parameter_counts(config.model),
                      "MAE": models.parameter_counts(experiment_config("study").model)}}
  env = {"device_kind": "cpu", "device_count": 1, "platform": "cpu", "host_cpus": 2,
         "load_average": [1.0, 1.0, 1.0], "jax": "x", "date_utc": "today"}
  records = {"AudioMAE++": [{"step": 10, "split": "train", "loss": 0.9},
                            {"step": 10, "split": "eval", "loss": 0.8},
                            {"step": 10, "split": "probe", "kws-v1": 70.0, "pitch-v1": 30.0,
                             "seconds": 9.0}],
             "MAE": [{"step": 10, "split": "probe", "kws-v1": 65.0, "pitch-v1": 35.0,
                      "seconds": 9.0}]}
  checks = {row: {t: {"linear": 70.0, "rank": 12.34, "dim": 480} for t in TASKS} for row in results}
  initial = {"kws-v1": 62.5, "pitch-v1": 40.0}
  study.write_report(output, results, records, checks, initial, TASKS, setup,
                     {"tasks": 30.0, "pretrain AudioMAE++": 90.0}, env)
  text = output.read_text()
  assert "old table" not in text and text.endswith("hand-written reading\n")
  assert "Wall time: 2.0 min" in text
  assert "`audiomaepp.tools.evaluate --order=heareval`, 10 seeds" in text
  # s(m) over the four rows: AudioMAE++ is the best on kws (1) and halfway on pitch (10 / 20).
  assert "| AudioMAE++ | 60.0 ± 1.5 | 40.0 ± 1.5 | 75.0 |" in text
  assert "| log-mel mean+std | 55.0 ± 1.5 | 50.0 ± 1.5 | 87.5 |" in text
  assert "| 10 | 160 | +5.0 | -5.0 | +0.0 |" in text  # the trend row
  assert "| 0 (its score) | 0 | 62.5 | 40.0 |" in text  # the initial encoder's probe
  assert "| 10 | 160 | +7.5 | -10.0 |" in text  # AudioMAE++'s gap to it
  assert "AudioMAE++ 11.1%; MAE pending" in text  # 9 s of probes in a 90 s run
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


def test_the_initial_encoders_probe_is_the_probe_of_its_hear_api_embeddings(study, tmp_path):
  """initial_probe (the probes' clips through the HEAR API's chunk encoder) against the HEAR
  API's scene embeddings of the same clips cut to one chunk, scored by the same probe."""
  import finetune_tasks  # pylint: disable=import-outside-toplevel
  from audiomaepp import hear_api  # pylint: disable=import-outside-toplevel
  from audiomaepp.audio import features  # pylint: disable=import-outside-toplevel
  from audiomaepp.train import probes  # pylint: disable=import-outside-toplevel
  finetune_tasks.write_tone_task(tmp_path, classes=3, per_class=4, seconds=2.5, multilabel=True)
  rng = np.random.default_rng(0)
  for split in ("train", "valid", "test"):  # labels unrelated to the tones: a score off 100
    path = tmp_path / "tones-v1" / f"{split}.json"
    labels = json.loads(path.read_text())
    rows = list(labels.values())
    path.write_text(json.dumps({f: rows[i] for f, i in zip(labels, rng.permutation(len(rows)))}))
  config = experiment_config("demo")
  config.model.width, config.model.num_heads, config.model.depth = 32, 2, 1
  config.probe.max_clips, config.probe.chunks_per_clip = 24, 1
  score = study.initial_probe(config, tmp_path, ["tones-v1"])["tones-v1"]
  model = study.random_init_model(config)
  task = probes.read_task(str(tmp_path / "tones-v1"), model.chunk_frames, 24, 1)
  assert len(task.targets) == 24
  samples = model.chunk_frames * features.HOP_LENGTH - 1
  clips = []
  for split in ("train", "valid", "test"):
    labels = json.loads((tmp_path / "tones-v1" / f"{split}.json").read_text())
    for i in probes.balanced_subset(list(labels.values()), 8):
      wave = audio.load_audio(str(tmp_path / "tones-v1" / "16000" / split / f"{i:03d}.wav"))
      clips.append(wave[:samples])
  embeddings = np.asarray(hear_api.get_scene_embeddings(np.stack(clips), model))
  assert score == pytest.approx(probes.probe_score(embeddings, task.targets, task.folds))
