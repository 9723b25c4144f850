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


def test_linear_probe_separates_what_is_separable_and_not_noise():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 30)
  x = rng.normal(size=(120, 16)) + 6.0 * np.eye(16)[y]
  fit, test = np.arange(120) % 3 != 0, np.arange(120) % 3 == 0
  assert probes.linear_probe_score(x[fit], y[fit], x[test], y[test]) == 100.0
  noise = rng.normal(size=(120, 16))
  assert probes.linear_probe_score(noise[fit], y[fit], noise[test], y[test]) < 60.0


def test_linear_probe_map_equals_the_mean_of_per_class_average_precisions():
  rng = np.random.default_rng(1)
  y = (rng.random((90, 3)) < 0.4).astype(np.float32)
  x = rng.normal(size=(90, 8)) + 1.5 * np.pad(y, ((0, 0), (0, 5)))
  y[60:, 2] = 0.0  # a class absent from the test rows is left out, as the kit does
  score = probes.linear_probe_score(x[:60], y[:60], x[60:], y[60:])
  from sklearn import linear_model, multiclass, preprocessing  # pylint: disable=import-outside-toplevel
  scaler = preprocessing.StandardScaler().fit(x[:60])
  model = multiclass.OneVsRestClassifier(linear_model.LogisticRegression(max_iter=3000)).fit(
      scaler.transform(x[:60]), y[:60])
  predicted = model.predict_proba(scaler.transform(x[60:]))
  expected = np.mean([float(scores_lib.average_precision(predicted[:, c], y[60:, c]))
                      for c in (0, 1)])
  assert score == pytest.approx(100 * expected, abs=1e-4)


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


def test_a_task_subset_keeps_the_fit_test_proportion_and_every_class(data):
  full = probes.read_task(str(data / "tones-v1"), 200)
  assert (full.num_fit, len(full.targets)) == (24, 36)
  part = probes.read_task(str(data / "tones-v1"), 200, max_clips=12)
  assert (part.num_fit, len(part.targets)) == (8, 12)
  assert sorted(part.targets[:8].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]
  assert sorted(part.targets[8:].tolist()) == [0, 0, 1, 2]  # test files 0-3: classes 0 1 2 0
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
    n = task.num_fit
    scores[name] = probes.linear_probe_score(embeddings[:n], task.targets[:n], embeddings[n:],
                                             task.targets[n:])
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
