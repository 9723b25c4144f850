"""HEAR API: parity with the original runtime, shapes and timestamps, bad input, restore."""
import jax
import numpy as np
import pytest

from audiomaepp import checkpointing
from audiomaepp import errors
from audiomaepp import hear_api
from audiomaepp import original
import faults

CLIPS = ("chirp_3p7s", "exact_2s", "sweep_10s_with_silence")


@pytest.fixture(scope="module")
def hear_fixture(fixtures_dir):
  return dict(np.load(fixtures_dir / "maepp_micro_hear.npz"))


@pytest.fixture(scope="module")
def micro(fixtures_dir):
  return original.load(fixtures_dir / "maepp_micro_weights.npz",
                       fixtures_dir / "maepp_micro_config.json")


@pytest.mark.parametrize("clip", CLIPS)
def test_original_layout_matches_original_runtime(micro, hear_fixture, clip):
  model = hear_api.from_variables(*micro, frame_layout="original")
  audio = hear_fixture[f"audio__{clip}"][None]
  frames, times = hear_api.get_timestamp_embeddings(audio, model)
  scene = hear_api.get_scene_embeddings(audio, model)
  np.testing.assert_allclose(frames, hear_fixture[f"timestamp_embeddings__{clip}"], atol=1e-4)
  np.testing.assert_allclose(times, hear_fixture[f"timestamps_ms__{clip}"], atol=1e-3)
  np.testing.assert_allclose(scene, hear_fixture[f"scene__{clip}"], atol=1e-4)


def test_time_major_layout_regroups_the_same_tokens(micro, hear_fixture):
  """Both layouts hold the same tokens; only which tokens form a frame differs.

  docs/reference.md#quirks-of-the-original (b).
  """
  audio = hear_fixture["audio__exact_2s"][None, :32000 - 160]  # 200 frames: exactly one chunk
  correct, _ = hear_api.get_timestamp_embeddings(audio, hear_api.from_variables(*micro))
  quirk, _ = hear_api.get_timestamp_embeddings(
      audio, hear_api.from_variables(*micro, frame_layout="original"))
  width = 64
  tokens = np.asarray(correct).reshape(50, 5, width).reshape(250, width)  # time-major order
  regrouped = tokens.reshape(5, 50, width).transpose(1, 0, 2).reshape(50, 5 * width)
  np.testing.assert_allclose(quirk[0], regrouped, atol=1e-5)


@pytest.mark.parametrize("seconds,frames", [(0.5, 13), (2.0, 51), (3.7, 93), (10.0, 251)])
def test_shapes_and_timestamps(micro, seconds, frames):
  model = hear_api.from_variables(*micro)
  audio = np.random.default_rng(0).normal(size=(3, int(seconds * 16000))).astype(np.float32)
  embeddings, times = hear_api.get_timestamp_embeddings(audio, model)
  assert model.timestamp_embedding_size == model.scene_embedding_size == 5 * 64
  assert embeddings.shape == (3, frames, 320)
  assert times.shape == (3, frames)
  # Frames are evenly spaced over the clip: 1 + samples // 160 log-mel frames, 4 per token.
  np.testing.assert_allclose(np.diff(times[0]), 1000 * seconds / frames, atol=2e-3)
  scene = hear_api.get_scene_embeddings(audio, model)
  np.testing.assert_allclose(scene, np.asarray(embeddings).mean(axis=1), atol=1e-5)
  assert np.isfinite(scene).all()


def test_nested_lists_are_accepted(micro, hear_fixture):
  """Audio as a list of lists (what HEAR's runner may pass) gives the array's embeddings."""
  model = hear_api.from_variables(*micro, frame_layout="original")
  audio = hear_fixture["audio__chirp_3p7s"][None]
  frames, times = hear_api.get_timestamp_embeddings(audio.tolist(), model)
  np.testing.assert_allclose(frames, hear_fixture["timestamp_embeddings__chirp_3p7s"], atol=1e-4)
  np.testing.assert_allclose(times, hear_fixture["timestamps_ms__chirp_3p7s"], atol=1e-3)


@pytest.mark.integration
def test_batch_matches_single_clips(micro):
  model = hear_api.from_variables(*micro)
  audio = np.random.default_rng(1).normal(size=(2, 24000)).astype(np.float32)
  batched = hear_api.get_scene_embeddings(audio, model)
  for i in range(2):
    np.testing.assert_allclose(batched[i], hear_api.get_scene_embeddings(audio[i:i + 1], model)[0],
                               atol=1e-5)


def test_silence_gives_finite_embeddings(micro):
  scene = hear_api.get_scene_embeddings(np.zeros((1, 16000), np.float32),
                                        hear_api.from_variables(*micro))
  assert np.isfinite(scene).all()


@pytest.mark.parametrize("audio,message", [
    (np.zeros(16000, np.float32), "n_sounds, n_samples"),
    (np.zeros((1, 0), np.float32), "zero samples"),
    (np.array([[0.0, np.nan] * 800, [0.0] * 1600], np.float32), r"sounds \[0\].*NaN"),
])
def test_bad_audio_is_named(micro, audio, message):
  with pytest.raises(ValueError, match=message):
    hear_api.get_scene_embeddings(audio, hear_api.from_variables(*micro))


def test_imported_checkpoint_restores(fixtures_dir, hear_fixture, tmp_path):
  workdir = str(tmp_path / "imported")
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), workdir,
                                    original_args=str(fixtures_dir / "maepp_micro_config.json"))
  model = hear_api.load_model(workdir, frame_layout="original")
  scene = hear_api.get_scene_embeddings(hear_fixture["audio__chirp_3p7s"][None], model)
  np.testing.assert_allclose(scene, hear_fixture["scene__chirp_3p7s"], atol=1e-4)
  with pytest.raises(errors.UserError, match="already holds checkpoints"):
    original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), workdir,
                                      original_args=str(fixtures_dir / "maepp_micro_config.json"))


@pytest.mark.parametrize("shape,message", [
    ((0, 16000), "audio has shape (0, 16000), an empty batch: expected (n_sounds, n_samples): a "
                 "batch of 16 kHz mono waveforms, at least one sound"),
    ((16000, 2), "audio has shape (16000, 2), which looks like one clip of 16000 samples with 2 "
                 "channels: expected (n_sounds, n_samples): a batch of 16 kHz mono waveforms; "
                 "downmix and add a batch axis: audio.mean(axis=1)[None]"),
])
def test_empty_batch_and_stereo_clip_say_what_shape_is_expected(micro, shape, message):
  model = hear_api.from_variables(*micro)
  audio = np.zeros(shape, np.float32)
  for embed in (hear_api.get_scene_embeddings, hear_api.get_timestamp_embeddings):
    with pytest.raises(errors.UserError) as error:
      embed(audio, model)
    assert str(error.value) == message


def _workdir_with_two_steps(fixtures_dir, workdir):
  """An imported workdir (step 0) plus step 5 holding the same parameters plus one."""
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), str(workdir),
                             original_args=str(fixtures_dir / "maepp_micro_config.json"))
  params = hear_api.load_model(str(workdir)).params
  checkpointing.save_params(str(workdir), jax.tree.map(lambda x: x + 1, params), step=5)
  return params


def test_load_model_falls_back_past_a_damaged_newest_step(fixtures_dir, tmp_path, caplog):
  workdir = tmp_path / "w"
  step0 = _workdir_with_two_steps(fixtures_dir, workdir)
  np.testing.assert_array_equal(hear_api.load_model(str(workdir)).params["cls_token"],
                                step0["cls_token"] + 1)  # step 5 while it is intact
  assert faults.truncate_checkpoint_arrays(workdir / "checkpoints" / "5")
  with caplog.at_level("WARNING"):
    model = hear_api.load_model(str(workdir))
  np.testing.assert_array_equal(model.params["cls_token"], step0["cls_token"])
  assert "checkpoint step 5 of" in caplog.text
  assert f"restored step 0 of {workdir} instead of the damaged newer steps [5]" in caplog.text
  assert (workdir / "checkpoints" / "5").is_dir()  # reading never moves or deletes anything

  faults.truncate_checkpoint_arrays(workdir / "checkpoints" / "0")
  with pytest.raises(errors.UserError) as error:
    hear_api.load_model(str(workdir))
  message = str(error.value)
  assert message.startswith(f"no checkpoint of {workdir} can be restored (step 5: ")
  assert "; step 0: " in message and "\n" not in message


def test_load_model_names_a_damaged_config_json(fixtures_dir, tmp_path):
  workdir = tmp_path / "w"
  original.import_to_workdir(str(fixtures_dir / "maepp_micro_weights.npz"), str(workdir),
                             original_args=str(fixtures_dir / "maepp_micro_config.json"))
  path = workdir / checkpointing.CONFIG_FILE
  path.write_text(path.read_text()[:100])
  with pytest.raises(errors.UserError, match=f"^{path}: not valid JSON .*damaged"):
    hear_api.load_model(str(workdir))


@pytest.mark.parametrize("chunks, compiled", [(1, 1), (3, 4), (12, 16), (32, 32), (33, 64),
                                              (65, 96), (199, 224), (256, 256), (300, 256)])
def test_chunk_batches_pad_to_powers_of_two_then_to_multiples_of_32(chunks, compiled):
  assert hear_api._bucket(chunks) == compiled  # pylint: disable=protected-access
