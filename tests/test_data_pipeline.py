"""The Grain pipeline on the synthetic corpus: crops, the global order, host blocks, resumption."""
import itertools
import os
import time

from absl import flags
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from audiomaepp.data import pipeline
from audiomaepp.data import synthetic
from audiomaepp import experiment
from audiomaepp.errors import UserError

NUM_CLIPS = 60  # every 10th clip is 'eval': 54 train, 6 eval


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  config = experiment.data_config()
  config.source = "synthetic"
  config.data_dir = str(tmp_path_factory.mktemp("synthetic"))
  config.synthetic_num_clips = NUM_CLIPS
  pipeline.ensure_dataset(config)  # builds the corpus once for the module
  return config


def _records(config, split):
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source(split=split)
  return {r["id"]: r for r in (source[i] for i in range(len(source)))}


def _batches(config, count, **kwargs):
  iterator = pipeline.create_iterator(config, **kwargs)
  try:
    return list(itertools.islice(iterator, count))
  finally:
    iterator.close()


def _ids(config, count, **kwargs):
  return [i for batch in _batches(config, count, **kwargs) for i in batch["id"]]


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
  batches = _batches(data_config, 2, split="eval", batch_size=4, seed=0, train=False)
  assert [b["spectrogram"].shape for b in batches] == [(4, 200, 80), (4, 200, 80)]
  ids = [i for b in batches for i in b["id"]]
  assert ids[6:] == ids[:2] and sorted(ids[:6]) == sorted(records)  # in order, repeated
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


def test_eval_crops_run_evenly_from_the_clip_start_to_its_end():
  spec = np.repeat(np.arange(301, dtype=np.float32)[:, None], 80, axis=1)  # frame i holds i
  one = pipeline.eval_crops(spec, 200, 1)
  assert one.shape == (1, 200, 80)
  np.testing.assert_array_equal(one[0], pipeline.crop(spec, 200))  # one: the centre crop
  assert [int(c[0, 0]) for c in pipeline.eval_crops(spec, 200, 3)] == [0, 50, 101]
  five_lengths = np.repeat(np.arange(1000, dtype=np.float32)[:, None], 80, axis=1)
  crops = pipeline.eval_crops(five_lengths, 200, 5)
  assert [int(c[0, 0]) for c in crops] == [0, 200, 400, 600, 800]  # every frame, once
  ten_seconds = np.repeat(np.arange(1001, dtype=np.float32)[:, None], 80, axis=1)
  crops = pipeline.eval_crops(ten_seconds, 200, 5)
  assert [int(c[0, 0]) for c in crops] == [0, 200, 400, 600, 801]
  # A 10-s clip has 1,001 frames: five crops of 200 leave out one of them.
  assert set(range(1001)) - set(crops[:, :, 0].ravel().astype(int)) == {800}
  short = np.arange(51 * 80, dtype=np.float32).reshape(51, 80)
  np.testing.assert_array_equal(pipeline.eval_crops(short, 200, 2)[0],
                                short[np.arange(200) % 51])  # repeated along time, as crop


def test_train_crop_offsets_cover_the_original_range():
  spec = np.repeat(np.arange(1001, dtype=np.float32)[:, None], 80, axis=1)
  rng = np.random.default_rng(0)
  offsets = [int(pipeline.crop(spec, 200, rng)[0, 0]) for _ in range(4000)]
  assert min(offsets) == 0 and max(offsets) == 800  # randint(0, T - 200): never 801
  assert pipeline.crop(spec[:200], 200, rng).shape == (200, 80)


def test_train_order_is_seeded_and_changes_every_epoch(data_config):
  kwargs = dict(split="train", batch_size=1, train=True)
  ids = _ids(data_config, 108, seed=0, **kwargs)
  first, second = ids[:54], ids[54:]
  everything = sorted(_records(data_config, "train"))
  assert sorted(first) == sorted(second) == everything
  assert first != second
  assert ids == _ids(data_config, 108, seed=0, **kwargs)
  assert ids != _ids(data_config, 108, seed=1, **kwargs)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _host_rows(config, hosts, first_batch, count, **kwargs):
  """Each global batch as the concatenation of the rows `hosts` hosts read of it."""
  per_host = [_batches(config, count, first_batch=first_batch, shard_index=i, shard_count=hosts,
                       **kwargs) for i in range(hosts)]
  return [{key: np.concatenate([rows[key] for rows in batch]) for key in batch[0]}
          for batch in zip(*per_host)]


@pytest.mark.parametrize("split,train", [("train", True), ("eval", False)])
def test_global_batches_do_not_depend_on_the_host_count(data_config, split, train):
  """Hosts read disjoint blocks of rows of the same global batches, crops included; resuming at a
  batch index (here after an epoch boundary: 54 / 12 = 4.5 batches) on any host count continues
  the same sequence."""
  kwargs = dict(split=split, batch_size=12, seed=3, train=train)
  one_host = _batches(data_config, 8, **kwargs)
  first_epoch = [i for b in one_host for i in b["id"]][:len(_records(data_config, split))]
  assert sorted(first_epoch) == sorted(_records(data_config, split))
  for hosts, first_batch in [(2, 0), (3, 0), (2, 5), (4, 5)]:
    _assert_same_batches(_host_rows(data_config, hosts, first_batch, 8 - first_batch, **kwargs),
                         one_host[first_batch:])


def test_a_fixed_number_of_batches_repeats_for_evaluation(data_config):
  kwargs = dict(split="eval", batch_size=4, seed=0, train=False)
  first_two = _batches(data_config, 2, **kwargs)
  _assert_same_batches(_batches(data_config, 5, num_batches=2, **kwargs), (first_two * 3)[:5])


def test_host_block_of_a_single_process_is_the_whole_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert pipeline.host_block(sharding, 8 * len(jax.devices())) == (0, 1)


def test_batch_size_must_split_evenly_over_the_hosts(data_config):
  with pytest.raises(ValueError, match="batch size 6 is not a positive multiple of the 4 hosts"):
    pipeline.create_dataset(data_config, split="train", batch_size=6, seed=0, train=True,
                            shard_index=0, shard_count=4)


@pytest.mark.slow  # spawning Grain workers costs ~20 s here
def test_worker_processes_make_the_same_batches(data_config):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  config = data_config.copy_and_resolve_references()
  config.num_workers = 2
  kwargs = dict(split="train", batch_size=8, seed=5, train=True, first_batch=3)
  _assert_same_batches(_batches(config, 4, **kwargs), _batches(data_config, 4, **kwargs))


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
  with pytest.raises(UserError, match="no built dataset 'audio_logmel'.*prepare_dataset"):
    pipeline.create_dataset(config, split="train", batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match="split 'valid' not in"):
    pipeline.create_dataset(data_config, split="valid", batch_size=2, seed=0, train=True)
  config.source = "hdf5"
  with pytest.raises(ValueError, match="'tfds', 'synthetic', 'rich' or 'real'"):
    pipeline.num_examples(config, "train")


def test_looking_up_the_synthetic_corpus_does_not_build_it(tmp_path):
  config = experiment.data_config()
  config.source = "synthetic"
  config.data_dir = str(tmp_path)
  with pytest.raises(UserError, match="built on first use by `ensure_dataset`"):
    pipeline.dataset_path(config)
  assert not os.listdir(tmp_path)
