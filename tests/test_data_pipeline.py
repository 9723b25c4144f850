"""The Grain pipeline on the synthetic corpus: crops, shuffling, host sharding, resumption."""
import time

from absl import flags
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from audiomaepp import checkpointing
from audiomaepp.data import pipeline
from audiomaepp.data import synthetic
from audiomaepp import experiment

NUM_CLIPS = 60  # every 10th clip is 'eval': 54 train, 6 eval


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  config = experiment.data_config()
  config.source = "synthetic"
  config.data_dir = str(tmp_path_factory.mktemp("synthetic"))
  config.synthetic_num_clips = NUM_CLIPS
  pipeline.dataset_path(config)  # builds the corpus once for the module
  return config


def _records(config, split):
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source(split=split)
  return {r["id"]: r for r in (source[i] for i in range(len(source)))}


def _ids(config, **kwargs):
  return [i for batch in pipeline.create_dataset(config, **kwargs) for i in batch["id"]]


def test_synthetic_corpus_is_deterministic_and_cached(data_config):
  start = time.perf_counter()
  path = synthetic.build(data_config.data_dir, NUM_CLIPS)
  assert time.perf_counter() - start < 0.5
  assert path == synthetic.dataset_dir(data_config.data_dir, NUM_CLIPS)
  assert pipeline.num_examples(data_config, "train") == 54
  assert pipeline.num_examples(data_config, "eval") == 6
  assert pipeline.num_classes(data_config) == len(synthetic.CLASSES)
  records = {**_records(data_config, "train"), **_records(data_config, "eval")}
  durations = []
  for i in range(NUM_CLIPS):
    waveform, names = synthetic.make_clip(i)
    np.testing.assert_array_equal(waveform, synthetic.make_clip(i)[0])
    record = records[f"syn{i:05d}".encode()]
    assert [synthetic.CLASSES[k] for k in record["labels"]] == list(names)
    assert record["duration"] == pytest.approx(waveform.size / 16000, abs=1e-4)
    durations.append(record["duration"])
  assert 0.3 <= min(durations) < 2.0 and max(durations) <= 10.0


def test_eval_batches_are_standardised_centre_crops(data_config):
  records = _records(data_config, "eval")
  batches = list(pipeline.create_dataset(data_config, split="eval", batch_size=4, seed=0,
                                         train=False, num_epochs=1))
  assert [b["spectrogram"].shape for b in batches] == [(4, 200, 80), (2, 200, 80)]
  for batch in batches:
    assert batch["spectrogram"].dtype == np.float32
    for spec, clip_id, labels in zip(batch["spectrogram"], batch["id"], batch["labels"]):
      full = records[clip_id]["spectrogram"].astype(np.float64)
      full = (full - full.mean()) / (full.std() + 1e-8)
      repeats = -(-200 // full.shape[0])
      full = np.concatenate([full] * repeats)  # short clips: repeated along time
      offset = (full.shape[0] - 200) // 2
      np.testing.assert_allclose(spec, full[offset:offset + 200], atol=1e-4)
      assert np.flatnonzero(labels).tolist() == list(records[clip_id]["labels"])


def test_short_clips_repeat_along_time_not_frequency():
  spec = np.arange(51 * 80, dtype=np.float32).reshape(51, 80)
  out = pipeline.crop(spec, 200)
  assert out.shape == (200, 80)
  offset = (204 - 200) // 2  # tiled to 4 x 51 = 204 frames, then the centre crop
  np.testing.assert_array_equal(out, spec[(np.arange(200) + offset) % 51])


def test_train_crop_offsets_cover_the_original_range():
  spec = np.repeat(np.arange(1001, dtype=np.float32)[:, None], 80, axis=1)
  rng = np.random.default_rng(0)
  offsets = [int(pipeline.crop(spec, 200, rng)[0, 0]) for _ in range(4000)]
  assert min(offsets) == 0 and max(offsets) == 800  # randint(0, T - 200): never 801
  assert pipeline.crop(spec[:200], 200, rng).shape == (200, 80)


def test_train_order_is_seeded_and_changes_every_epoch(data_config):
  kwargs = dict(split="train", batch_size=1, train=True, num_epochs=2)
  ids = _ids(data_config, seed=0, **kwargs)
  first, second = ids[:54], ids[54:]
  everything = sorted(_records(data_config, "train"))
  assert sorted(first) == sorted(second) == everything
  assert first != second
  assert ids == _ids(data_config, seed=0, **kwargs)
  assert ids != _ids(data_config, seed=1, **kwargs)


@pytest.mark.parametrize("split,train", [("train", True), ("eval", False)])
def test_two_hosts_read_disjoint_records_covering_the_split(data_config, split, train):
  per_host = [_ids(data_config, split=split, batch_size=5, seed=3, train=train, num_epochs=1,
                   drop_remainder=False, shard_index=i, shard_count=2) for i in range(2)]
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == sorted(_records(data_config, split))
  assert abs(len(per_host[0]) - len(per_host[1])) <= 1


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["spectrogram"], y["spectrogram"])


def _resume_check(config):
  kwargs = dict(split="train", batch_size=8, seed=5, train=True)
  iterator = pipeline.create_iterator(config, **kwargs)
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (6 per epoch)
  resumed = pipeline.create_iterator(config, **kwargs)
  resumed.set_state(state)
  _assert_same_batches([next(resumed) for _ in range(4)], expected)


def test_get_state_set_state_resumes_on_the_next_batch(data_config):
  _resume_check(data_config)


@pytest.mark.slow  # spawning Grain workers costs ~20 s here
def test_resume_with_worker_processes(data_config):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  config = data_config.copy_and_resolve_references()
  config.num_workers = 1
  _resume_check(config)


def test_iterator_round_trips_through_orbax_checkpoint_manager(data_config, tmp_path):
  kwargs = dict(split="train", batch_size=8, seed=1, train=True)
  iterator = pipeline.create_iterator(data_config, **kwargs)
  next(iterator)
  next(iterator)
  with checkpointing.checkpoint_manager(str(tmp_path), enable_async_checkpointing=False) as mgr:
    mgr.save(7, args=ocp.args.Composite(
        **{checkpointing.DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(iterator)}))
  expected = [next(iterator) for _ in range(3)]
  fresh = pipeline.create_iterator(data_config, **kwargs)
  with checkpointing.checkpoint_manager(str(tmp_path), read_only=True) as mgr:
    mgr.restore(7, args=ocp.args.Composite(
        **{checkpointing.DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(fresh)}))
  _assert_same_batches([next(fresh) for _ in range(3)], expected)


def test_make_global_batch_places_the_host_batch_on_the_mesh(data_config):
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(pipeline.create_iterator(data_config, split="train", batch_size=2 * devices.size,
                                        seed=0, train=True))
  global_batch = pipeline.make_global_batch(batch, sharding)
  assert set(global_batch) == {"spectrogram", "labels"}  # ids stay on the host
  for key, value in global_batch.items():
    assert isinstance(value, jax.Array) and value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_missing_dataset_errors_say_how_to_build_it(data_config, tmp_path):
  config = experiment.data_config()
  with pytest.raises(ValueError, match="data_dir is not set.*prepare_dataset"):
    pipeline.num_examples(config, "train")
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="no built dataset 'audio_logmel'.*prepare_dataset"):
    pipeline.create_dataset(config, split="train", batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match="split 'valid' not in"):
    pipeline.create_dataset(data_config, split="valid", batch_size=2, seed=0, train=True)
  config.source = "hdf5"
  with pytest.raises(ValueError, match="'tfds', 'synthetic' or 'rich'"):
    pipeline.num_examples(config, "train")
