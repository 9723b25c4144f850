"""Original-checkpoint import and the embed tool end to end on generated HEAR tasks."""
import json
import subprocess
import sys

import numpy as np
import pytest

from audiomaepp import audio
from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp import original
from audiomaepp.evaluation import tasks
from audiomaepp import experiment

# Runs main.py or a CLI in subprocesses, or trains end to end: not in `make test-fast`.
pytestmark = pytest.mark.integration


def _run(*args):
  done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_import_cli_then_embed_tasks_and_files(fixtures_dir, hear_suite_dir, tmp_path):
  workdir = tmp_path / "micro"
  _run("audiomaepp.tools.import_original",
       f"--weights={fixtures_dir / 'maepp_micro_weights.npz'}",
       f"--original_args={fixtures_dir / 'maepp_micro_config.json'}", f"--output_dir={workdir}")
  assert checkpointing.load_config(str(workdir)).model.width == 64

  out = tmp_path / "embeddings"
  _run("audiomaepp.tools.embed", f"--checkpoint={workdir}", f"--tasks_dir={hear_suite_dir}",
       "--tasks=kws", f"--output_dir={out}")
  task = tasks.read_task_embeddings(out / "kws-v1")
  source = tasks.read_hear_task(hear_suite_dir / "kws-v1")
  for split, data in source.splits.items():
    assert task.splits[split].embeddings.shape == (len(data.files), 5 * 64)
    assert task.splits[split].labels == data.labels
    assert np.isfinite(task.splits[split].embeddings).all()

  # The stored embedding of a clip is the HEAR API's scene embedding of that clip.
  model = hear_api.load_model(str(workdir))
  first = source.splits["test"].paths[0]
  expected = hear_api.get_scene_embeddings(audio.load_audio(first)[None], model)[0]
  np.testing.assert_allclose(task.splits["test"].embeddings[0], expected, atol=1e-4)

  # A second run finds the task complete and leaves it untouched.
  stamp = (out / "kws-v1" / "test.embeddings.npy").stat().st_mtime_ns
  _run("audiomaepp.tools.embed", f"--checkpoint={workdir}", f"--tasks_dir={hear_suite_dir}",
       "--tasks=kws", f"--output_dir={out}")
  assert (out / "kws-v1" / "test.embeddings.npy").stat().st_mtime_ns == stamp

  files_out = tmp_path / "files"
  stdout = _run("audiomaepp.tools.embed", f"--checkpoint={workdir}", f"--audio={first}",
                f"--output_dir={files_out}")
  assert "320 values" in stdout
  np.testing.assert_allclose(np.load(files_out / (first.stem + ".npy")), expected, atol=1e-4)


def test_import_with_an_experiment_config(fixtures_dir, tmp_path):
  """--config route: the original arguments are derived from our model config."""
  with open(fixtures_dir / "maepp_micro_config.json") as f:
    args = json.load(f)
  config = experiment.base_config()
  config.model = original.model_config_from_args(args)
  config.batch_size = 64
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), str(tmp_path),
                             config=config)
  assert checkpointing.load_config(str(tmp_path)).batch_size == 64
  weights = np.load(fixtures_dir / "maepp_micro_weights.npz")
  model = hear_api.load_model(str(tmp_path))
  np.testing.assert_array_equal(model.params["cls_token"], weights["cls_token"])
