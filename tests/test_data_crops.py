"""Training and evaluation crops from the stored per-clip moments equal crops of the whole
standardised clip; shards of version 1.0.0 (without moments) still read; worker count `auto`."""
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from audiomaepp import audio
from audiomaepp import experiment
from audiomaepp.data import builders
from audiomaepp.data import pipeline
from audiomaepp.data import sources
from audiomaepp.errors import UserError

SECONDS = (0.5, 1.99, 2.01, 3.7)  # 51 frames (tiled), 200, 202 and 371 frames


@pytest.fixture(scope="module")
def serialized(tmp_path_factory):
  """The raw records of a small build: id -> serialized bytes."""
  root = tmp_path_factory.mktemp("crops")
  (root / "audio").mkdir()
  rng = np.random.default_rng(0)
  for i, seconds in enumerate(SECONDS):
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(root / "audio" / f"clip{i}.wav", wave, 16000)
  builder, _ = builders.build(sources.Sources(str(root / "audio"), eval_fraction=0.0),
                              str(root / "out"), progress=False)
  source = tfds.builder_from_directory(builder.data_path).as_data_source(
      split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  records = [source[i] for i in range(len(source))]
  return {pipeline.decode_record(r)["id"].decode(): r for r in records}


def _reference(spectrogram: np.ndarray) -> np.ndarray:
  """Whole-clip standardisation in float64, written out independently of the package."""
  x = spectrogram.astype(np.float64)
  return (x - x.mean()) / (x.std() + 1e-8)


def _without_moments(record: bytes) -> bytes:
  """The record as a version 1.0.0 shard held it: no mean, no std."""
  example = tf_example_pb2.Example.FromString(record)
  del example.features.feature["mean"]
  del example.features.feature["std"]
  return example.SerializeToString()


def test_stored_moments_are_those_of_the_float16_clip(serialized):
  assert len(serialized) == len(SECONDS)
  for raw in serialized.values():
    record = pipeline.decode_record(raw)
    x = record["spectrogram"].astype(np.float64)
    assert record["mean"] == pytest.approx(x.mean(), rel=1e-6, abs=1e-6)
    assert record["std"] == pytest.approx(x.std(), rel=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_crops_equal_crops_of_the_whole_standardised_clip(serialized, train):
  for seed, raw in enumerate(serialized.values()):
    record = pipeline.decode_record(raw)
    old = pipeline.decode_record(_without_moments(raw))
    assert old["mean"] is None and old["std"] is None
    rng = (lambda: np.random.default_rng(seed)) if train else (lambda: None)
    crop = pipeline.standardized_crop(record, 200, rng())
    assert crop.shape == (200, 80) and crop.dtype == np.float32
    # Bit for bit what standardising the whole clip first gave (the pipeline before 1.1.0) ...
    np.testing.assert_array_equal(
        crop, pipeline.crop(audio.standardize(record["spectrogram"]), 200, rng()))
    np.testing.assert_array_equal(crop, pipeline.standardized_crop(old, 200, rng()))
    # ... and within float32 rounding of an independent float64 computation.
    np.testing.assert_allclose(
        crop, pipeline.crop(_reference(record["spectrogram"]), 200, rng()), rtol=0, atol=2e-6)


def test_the_crop_transform_gives_the_standardised_crop_and_no_labels_without_classes(serialized):
  for train in (True, False):
    transform = pipeline._Crop(200, 0, train)  # pylint: disable=protected-access
    for raw in serialized.values():
      example = transform.random_map(raw, np.random.default_rng(1))
      expected = pipeline.standardized_crop(pipeline.decode_record(raw), 200,
                                            np.random.default_rng(1) if train else None)
      np.testing.assert_array_equal(example["spectrogram"], expected)
      assert sorted(example) == ["id", "spectrogram"]


def test_num_workers_auto_is_zero_on_cpu(monkeypatch):
  config = experiment.data_config()
  assert config.num_workers == -1
  assert pipeline.num_workers(config) == 0  # the tests run JAX on CPU
  monkeypatch.setattr(pipeline.jax, "default_backend", lambda: "gpu")
  for name in ("SLURM_CPUS_PER_TASK", *pipeline.LOCAL_PROCESS_COUNT_VARS):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)))
  assert pipeline.num_workers(config) == 14
  config.num_workers = 3
  assert pipeline.num_workers(config) == 3
  config.num_workers = -2
  with pytest.raises(UserError, match=r"num_workers must be -1 \(auto\) or >= 0, got -2"):
    pipeline.num_workers(config)


@pytest.mark.parametrize("affinity, env, workers", [
    (96, {}, 94),  # alone on the machine
    (96, {"SLURM_NTASKS_PER_NODE": "8"}, 10),  # 8 unbound tasks share 96 cores: 12 each
    (96, {"LOCAL_WORLD_SIZE": "4"}, 22),
    (12, {"SLURM_NTASKS_PER_NODE": "8"}, 10),  # bound by the launcher: the mask is the share
    (96, {"SLURM_CPUS_PER_TASK": "12", "SLURM_NTASKS_PER_NODE": "8"}, 10),
    (96, {"SLURM_NTASKS_PER_NODE": "64"}, 0),
])
def test_auto_workers_use_this_process_share_of_the_cores(monkeypatch, affinity, env, workers):
  monkeypatch.setattr(pipeline.jax, "default_backend", lambda: "gpu")
  for name in ("SLURM_CPUS_PER_TASK", *pipeline.LOCAL_PROCESS_COUNT_VARS):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 96)
  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(affinity)))
  assert pipeline.num_workers(experiment.data_config()) == workers
