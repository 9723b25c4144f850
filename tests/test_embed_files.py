"""tools.embed on audio files: relative output paths, frame-level embeddings, --step."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from audiomaepp import audio
from audiomaepp import checkpointing
from audiomaepp import hear_api
from audiomaepp import original
from audiomaepp.evaluation import embedding


def test_output_names_keep_relative_paths_and_never_collide():
  names = embedding.output_names(["/d/speech/a.wav", "/d/music/a.wav", "/d/music/b.wav",
                                  "/d/music/b.flac"], ".npy")
  assert names == ["speech/a.npy", "music/a.npy", "music/b.wav.npy", "music/b.flac.npy"]
  assert embedding.output_names(["/d/x/one.wav"], ".npz") == ["one.npz"]


@pytest.mark.integration
def test_embed_files_with_same_names_steps_and_timestamps(fixtures_dir, tmp_path):
  weights = dict(np.load(fixtures_dir / "maepp_micro_weights.npz"))
  args = fixtures_dir / "maepp_micro_config.json"
  workdir = tmp_path / "micro"
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), str(workdir),
                             original_args=str(args))
  scale = 2.0 * weights["encoder.encoder_norm.weight"]
  _, changed = original.load({**weights, "encoder.encoder_norm.weight": scale}, args)
  checkpointing.save_params(str(workdir), changed["params"], step=9)

  rng = np.random.default_rng(0)
  clips = {"speech/a.wav": 1.5, "music/a.wav": 2.5, "music/b.wav": 2.5}
  paths = []
  for name, seconds in clips.items():
    path = tmp_path / "audio" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, 0.1 * rng.standard_normal(int(seconds * 16000)), 16000)
    paths.append(path)

  def run(*flags):
    done = subprocess.run([sys.executable, "-m", "audiomaepp.tools.embed",
                           f"--checkpoint={workdir}", f"--audio={','.join(map(str, paths))}",
                           *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

  run("--step=0", f"--output_dir={tmp_path / 'scene'}")
  step0 = hear_api.load_model(str(workdir), step=0)
  for name, path in zip(clips, paths):
    stored = np.load(tmp_path / "scene" / name.replace(".wav", ".npy"))
    expected = hear_api.get_scene_embeddings(audio.load_audio(path)[None], step0)[0]
    np.testing.assert_allclose(stored, expected, atol=1e-4)

  stdout = run("--kind=timestamp", f"--output_dir={tmp_path / 'frames'}")  # newest: step 9
  assert "frames x 320 values" in stdout
  step9 = hear_api.load_model(str(workdir))
  for name, path in zip(clips, paths):
    stored = np.load(tmp_path / "frames" / name.replace(".wav", ".npz"))
    frames, times = hear_api.get_timestamp_embeddings(audio.load_audio(path)[None], step9)
    np.testing.assert_allclose(stored["embeddings"], frames[0], atol=1e-4)
    np.testing.assert_allclose(stored["timestamps_ms"], times[0], atol=1e-3)
  assert not np.allclose(np.load(tmp_path / "frames" / "music/a.npz")["embeddings"].mean(0),
                         np.load(tmp_path / "scene" / "music/a.npy"), atol=1e-3)

  done = subprocess.run([sys.executable, "-m", "audiomaepp.tools.embed", "--kind=timestamp",
                         "--baseline=logmel_stats", f"--audio={paths[0]}",
                         f"--output_dir={tmp_path / 'x'}"], capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("error: --kind=timestamp needs")
