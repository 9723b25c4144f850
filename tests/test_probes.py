"""Probes while pretraining: the linear probe's scores, the embeddings (equal to the HEAR API's),
the config checks before compiling, a task deleted under the run, and the checkpoint records."""
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from audiomaepp import audio as audio_lib
from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp import metrics
from audiomaepp.audio import features
from audiomaepp.evaluation import scores as scores_lib
from audiomaepp.train import pretrain
from audiomaepp.train import probes
from audiomaepp.train.runner import ConfigError
from conftest import experiment_config
import faults
import finetune_tasks
import main_runs


def test_the_probe_separates_what_is_separable_and_not_noise():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 30)
  folds = np.arange(120) % 3
  x = rng.normal(size=(120, 16)) + 6.0 * np.eye(16)[y]
  assert probes.probe_score(x, y, folds) == 100.0
  noise = rng.normal(size=(120, 16))
  assert probes.probe_score(noise, y, folds) < 45.0


def test_every_clip_is_scored_by_a_ridge_fit_on_the_other_folds():
  """An independent computation: per fold, standardise with the other folds' statistics, solve
  the ridge normal equations for +-1 one-hot targets at each penalty, keep the penalty of least
  leave-one-out error (closed form), predict the fold's clips; pool the hits."""
  rng = np.random.default_rng(2)
  y = np.repeat(np.arange(3), 12)
  folds = np.tile(np.arange(3), 12)
  x = rng.normal(size=(36, 5)) + 1.2 * np.eye(5)[y]
  hits = 0
  for f in range(3):
    fit, test = folds != f, folds == f
    mean, std = x[fit].mean(0), x[fit].std(0)
    a, b = (x[fit] - mean) / std, (x[test] - mean) / std
    t = 2.0 * np.eye(3)[y[fit]] - 1.0
    design = np.c_[a, np.ones(len(a))]
    best = None
    for alpha in probes.RIDGE_ALPHAS:
      penalty = alpha * np.diag([1.0] * 5 + [0.0])  # the intercept is not penalised
      hat = design @ np.linalg.solve(design.T @ design + penalty, design.T)
      loo = ((t - hat @ t) / (1.0 - np.diag(hat))[:, None]) ** 2
      if best is None or loo.mean() < best[0] - 1e-12:
        best = (loo.mean(), np.linalg.solve(design.T @ design + penalty, design.T @ t))
    hits += int(((np.c_[b, np.ones(len(b))] @ best[1]).argmax(1) == y[test]).sum())
  assert probes.probe_score(x, y, folds) == pytest.approx(100 * hits / 36)
  assert 40.0 < 100 * hits / 36 < 100.0  # neither chance nor trivially separable


def test_the_probe_handles_a_class_missing_from_a_fit_and_two_classes():
  y = np.array([0, 0, 1, 1, 0, 1, 2, 0, 1])
  folds = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])  # class 2 only in fold 1: never predicted there
  x = 5.0 * np.eye(3)[y] + np.random.default_rng(3).normal(size=(9, 3)) * 0.1
  assert probes.probe_score(x, y, folds) == pytest.approx(100 * 8 / 9)
  assert probes.probe_score(x[y < 2], y[y < 2], folds[y < 2]) == 100.0


def test_the_probe_map_pools_every_folds_scores_per_class():
  rng = np.random.default_rng(1)
  y = (rng.random((90, 3)) < 0.4).astype(np.float32)
  x = rng.normal(size=(90, 8)) + 1.5 * np.pad(y, ((0, 0), (0, 5)))
  folds = np.arange(90) % 3
  y[:, 2] = 0.0  # a class absent everywhere is left out, as the kit does
  score = probes.probe_score(x, y, folds)
  from sklearn import linear_model, pipeline, preprocessing  # pylint: disable=import-outside-toplevel
  pooled = np.zeros_like(y)
  for f in range(3):
    model = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                   linear_model.RidgeClassifierCV(alphas=probes.RIDGE_ALPHAS))
    pooled[folds == f] = model.fit(x[folds != f], y[folds != f]).decision_function(x[folds == f])
  expected = np.mean([float(scores_lib.average_precision(pooled[:, c], y[:, c])) for c in (0, 1)])
  assert score == pytest.approx(100 * expected, abs=1e-4)
  assert score > 60.0


@pytest.mark.parametrize("doubling, expected", [
    (False, [250, 500, 750, 1000, 1250, 1500, 1750, 1800]),
    (True, [250, 500, 1000, 1800]),
])
def test_probes_run_every_n_steps_or_at_doubling_steps_and_at_the_last(doubling, expected):
  probe = experiment_config("demo").probe
  probe.every_steps, probe.doubling = 250, doubling
  assert [s for s in range(1, 1801) if probes.due(s, probe, 1800)] == expected


def test_a_balanced_subset_takes_each_class_in_turn_in_file_order():
  labels = [["a"], ["a"], ["a"], ["b"], ["c"], ["c"], ["a"], ["b"]]
  assert probes.balanced_subset(labels, 3) == [0, 3, 4]
  assert probes.balanced_subset(labels, 5) == [0, 1, 3, 4, 5]
  assert probes.balanced_subset(labels, 0) == list(range(8))
  assert probes.balanced_subset(labels, 99) == list(range(8))


def test_a_task_subset_keeps_the_split_proportions_and_every_class(data):
  full = probes.read_task(str(data / "tones-v1"), 200)
  assert np.bincount(full.folds).tolist() == [12, 12, 12]  # train, valid, test
  part = probes.read_task(str(data / "tones-v1"), 200, max_clips=12)
  assert np.bincount(part.folds).tolist() == [4, 4, 4]
  for fold in range(3):  # files 0-3 of each split: classes 0 1 2 0
    assert sorted(part.targets[part.folds == fold].tolist()) == [0, 0, 1, 2]
  assert part.chunks.shape == (12, 200, 80)
  np.testing.assert_array_equal(part.chunks[8], full.chunks[24])


def test_clips_are_cut_to_the_chunks_per_clip_as_the_hear_api_would_embed_the_cut_audio(data):
  whole = probes.read_task(str(data / "chords-v1"), 200)
  assert whole.chunks.shape[0] == 2 * len(whole.targets)  # 2.5 s: 251 log-mel frames
  cut = probes.read_task(str(data / "chords-v1"), 200, chunks_per_clip=1)
  assert cut.chunks.shape[0] == len(cut.targets)
  first = audio_lib.load_audio(str(sorted((data / "chords-v1" / "16000" / "train").iterdir())[0]))
  samples = 200 * features.HOP_LENGTH - 1  # the longest audio of 200 frames or fewer
  assert features.num_frames(samples) == 200 < features.num_frames(samples + 1)
  expected, _, pad = hear_api.log_mel_chunks(first[None, :samples], 200)
  np.testing.assert_allclose(cut.chunks[0], np.asarray(expected)[0], atol=1e-6)
  assert (cut.pad, pad) == (0, 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("probes")
  faults.write_tone_shards(root)
  finetune_tasks.write_tone_task(root, classes=3, per_class=4)
  finetune_tasks.write_tone_task(root, name="chords-v1", multilabel=True, seconds=2.5)
  return root


def _config(data, tasks, steps=4, every=2):
  config = experiment_config("demo")
  config.data.source, config.data.data_dir = "tfds", str(data / "shards")
  config.model.width, config.model.num_heads, config.model.depth = 32, 2, 1
  config.model.decoder_width, config.model.decoder_depth = 32, 1
  config.batch_size, config.eval_batches = 4, 0
  config.num_train_steps = steps
  config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = every
  config.probe.tasks = ",".join(str(data / t) for t in tasks)
  config.probe.every_steps = every
  return config


@pytest.mark.integration
def test_probe_scores_are_logged_recorded_and_equal_the_hear_api_path(data, tmp_path):
  workdir = tmp_path / "w"
  pretrain.run(_config(data, ["tones-v1", "chords-v1"]), str(workdir))
  records = [r for r in metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
             if r["split"] == "probe"]
  assert [r["step"] for r in records] == [2, 4]
  assert all(0.0 <= r[t] <= 100.0 for r in records for t in ("tones-v1", "chords-v1"))
  assert all(r["seconds"] > 0 for r in records)
  for record in records:
    saved = checkpointing.saved_record(str(workdir), record["step"])
    assert saved["probe"] == {t: pytest.approx(record[t]) for t in ("tones-v1", "chords-v1")}
  # The last probe, recomputed independently: the restored encoder through the HEAR API.
  expected = _hear_api_scores(workdir, 4, data, ("tones-v1", "chords-v1"))
  assert {t: records[-1][t] for t in expected} == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("change, message", [
    (lambda c, d: setattr(c.probe, "tasks", str(d / "missing-v1")),
     "config.probe.tasks: {d}/missing-v1: "),
    (lambda c, d: setattr(c.probe, "max_clips", -1),
     "config.probe.max_clips=-1: expected 0 (every clip) or a positive number"),
    (lambda c, d: setattr(c.probe, "chunks_per_clip", -1),
     "config.probe.chunks_per_clip=-1: expected 0 (the whole clip) or a positive number"),
    (lambda c, d: setattr(c.probe, "every_steps", 0),
     "config.probe.every_steps=0: expected a positive integer"),
    (lambda c, d: setattr(c.probe, "tasks", f"{d}/tones-v1,{d}/tones-v1"),
     "have the same name 'tones-v1'"),
])
def test_a_bad_probe_config_is_one_line_before_anything_is_written(data, tmp_path, change,
                                                                   message):
  config = _config(data, ["tones-v1"])
  change(config, data)
  with pytest.raises(ConfigError, match=re.escape(message.format(d=data))) as error:
    pretrain.run(config, str(tmp_path / "w"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists()


@pytest.mark.integration
def test_a_task_deleted_under_the_run_warns_once_and_training_goes_on(data, tmp_path, caplog):
  doomed = tmp_path / "doomed-v1"
  shutil.copytree(data / "tones-v1", doomed)
  config = _config(data, ["chords-v1"], steps=6)
  config.probe.tasks += f",{doomed}"

  def delete(step):
    if step == 2:
      shutil.rmtree(doomed)

  with caplog.at_level(logging.WARNING):
    result = pretrain.PretrainTask(config)
    pretrain.runner.run(result, str(tmp_path / "w"), on_step=delete)
  warnings = [r.getMessage() for r in caplog.records if "probe of" in r.getMessage()]
  assert len(warnings) == 1 and str(doomed) in warnings[0]
  assert "training goes on" in warnings[0]
  records = [r for r in metrics.read_jsonl(str(tmp_path / "w" / metrics.METRICS_FILE))
             if r["split"] == "probe"]
  assert [r["step"] for r in records] == [2, 4, 6]
  assert all("chords-v1" in r and "doomed-v1" not in r for r in records)


def _hear_api_scores(workdir, step, data, names):
  """The linear probe of each task on the HEAR API's embeddings from the restored checkpoint, of
  clips cut to one chunk (the probes' default)."""
  model = hear_api.load_model(str(workdir), step=step)
  samples = model.chunk_frames * features.HOP_LENGTH - 1
  scores = {}
  for name in names:
    task = probes.read_task(str(data / name), model.chunk_frames)  # for the targets
    clips = [audio_lib.load_audio(str(p))[:samples] for s in ("train", "valid", "test")
             for p in sorted((data / name / "16000" / s).iterdir())]
    embeddings = np.asarray(hear_api.get_scene_embeddings(np.stack(clips), model))
    scores[name] = probes.probe_score(embeddings, task.targets, task.folds)
  return scores


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_fsdp_hosts_probe_what_the_hear_api_scores(data, tmp_path):
  """Two processes, the parameters sharded over both: each host feeds its rows of the probe
  batches; the logged scores equal the HEAR API's on the restored encoder."""
  workdir = tmp_path / "w"
  tasks = ",".join(str(data / t) for t in ("tones-v1", "chords-v1"))
  command = [sys.executable, "main.py", *main_runs.shrunk_demo(4, checkpoint_every=2),
             f"--workdir={workdir}", "--config.mesh.data=1", "--config.mesh.fsdp=2",
             "--config.shard_params=True", f"--config.probe.tasks={tasks}",
             "--config.probe.every_steps=2"]
  port = main_runs.free_port()
  procs = [subprocess.Popen(
      [*command, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=main_runs.REPO,
      env=main_runs.fast_env(tmp_path / "cache", devices=1), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]
  codes, outputs = main_runs.finish(procs)
  assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
  records = [r for r in metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
             if r["split"] == "probe"]
  assert [r["step"] for r in records] == [2, 4]
  expected = _hear_api_scores(workdir, 4, data, ("tones-v1", "chords-v1"))
  assert {t: records[-1][t] for t in expected} == pytest.approx(expected, abs=1e-3)
