"""Grain input pipeline: log-mel shards -> per-host batches -> one global array on the mesh.

Per example (SPEC §2): the stored full-clip log-mel (float16) is standardised over the whole
clip (NumPy std, as the original training parser), then cropped to `crop_frames`: a random
offset in [0, T - crop_frames) for training (the original's `randint` range, so the last offset
is never drawn), the centre for evaluation. Clips shorter than `crop_frames` are first repeated
along time. (The original calls `np.tile(spec, k)` on a (time, mel) array, which tiles the last
axis -- frequency -- and yields an 80*k-bin spectrogram of the wrong shape: a bug, fixed here.)

Each JAX process reads a disjoint contiguous part of the split (Grain `ShardOptions`), shuffles
it with a seed that changes every epoch, and yields per-host batches
`{'spectrogram': (batch, crop_frames, mel) float32, 'id': (batch,) bytes,
'labels': (batch, classes) float32 multi-hot (labelled datasets only)}`. The iterator's state
is checkpointable with Orbax (`grain.checkpoint.CheckpointSave`; `audiomaepp.checkpointing` saves
it as the item 'data_iter').
"""
import math
import os
from typing import Any, Optional

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from audiomaepp.audio import features
from audiomaepp.data import rich
from audiomaepp.data import synthetic
from audiomaepp.data import worker_memory

# Grain workers import this module (to unpickle the operations below, or with the main module):
# new shared-memory segments are registered with the resource tracker before they exist, in
# every process (see worker_memory; where no segment is created this changes nothing).
worker_memory.register_names_before_creation()

_PREPARE_HINT = ("build shards with `python -m audiomaepp.tools.prepare_dataset "
                 "--audio_dir=AUDIO --output_dir=DIR` and set config.data.data_dir=DIR, or use "
                 "config.data.source='synthetic' for the built-in corpus")


def dataset_path(data_config: ml_collections.ConfigDict) -> str:
  """Directory of the built dataset (`<data_dir>/<name>/<latest version>`).

  For sources 'synthetic' and 'rich' the built-in corpus is built on first use, into `data_dir`
  or ~/.cache/audiomaepp.
  """
  if data_config.source == "synthetic":
    data_dir = synthetic.build(data_config.data_dir, data_config.synthetic_num_clips)
  elif data_config.source == "rich":
    data_dir = rich.build(data_config.data_dir, data_config.synthetic_num_clips)
  elif data_config.source == "tfds":
    data_dir = data_config.data_dir
    if not data_dir:
      raise ValueError(f"config.data.data_dir is not set: {_PREPARE_HINT}")
  else:
    raise ValueError(f"config.data.source must be 'tfds', 'synthetic' or 'rich', got "
                     f"{data_config.source!r}")
  root = os.path.join(data_dir, data_config.name)
  versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])
              if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    raise FileNotFoundError(f"no built dataset {data_config.name!r} under {data_dir}: "
                            f"{_PREPARE_HINT}")
  latest = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
  return os.path.join(root, latest)


def _builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  # Read from the directory alone: no builder class (or its build inputs) needed.
  return tfds.builder_from_directory(dataset_path(data_config))


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {builder.data_dir}; it has "
                     f"{sorted(builder.info.splits.keys())}")


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of clips in `split` (all hosts together)."""
  builder = _builder(data_config)
  _check_split(builder, split)
  return builder.info.splits[split].num_examples


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of label classes of the dataset (0 for unlabelled folders)."""
  return _builder(data_config).info.features["labels"].feature.num_classes


def crop(spectrogram: np.ndarray, crop_frames: int,
         rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """`(time, mel)` -> `(crop_frames, mel)`: random offset with `rng`, else the centre.

  Clips shorter than `crop_frames` are repeated along time first (not along mel, as the
  original's `np.tile(spec, k)` does).
  """
  frames = spectrogram.shape[0]
  if frames < crop_frames:
    spectrogram = np.tile(spectrogram, (math.ceil(crop_frames / frames), 1))
    frames = spectrogram.shape[0]
  if frames == crop_frames:
    offset = 0
  elif rng is None:
    offset = (frames - crop_frames) // 2
  else:
    offset = int(rng.integers(0, frames - crop_frames))
  return spectrogram[offset:offset + crop_frames]


def _example(record: dict, spectrogram: np.ndarray, classes: int) -> dict:
  example = {"spectrogram": spectrogram, "id": np.bytes_(record["id"])}
  if classes:
    multi_hot = np.zeros(classes, np.float32)
    multi_hot[np.asarray(record["labels"], np.int64)] = 1.0
    example["labels"] = multi_hot
  return example


class _TrainCrop(grain.transforms.RandomMap):
  """Standardise the whole clip, then a random crop (Grain seeds `rng` per record and epoch)."""

  def __init__(self, crop_frames: int, classes: int):
    self._crop_frames = crop_frames
    self._classes = classes

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    spectrogram = features.standardize(record["spectrogram"])
    return _example(record, crop(spectrogram, self._crop_frames, rng), self._classes)


class _EvalCrop(grain.transforms.Map):
  """Standardise the whole clip, then the centre crop."""

  def __init__(self, crop_frames: int, classes: int):
    self._crop_frames = crop_frames
    self._classes = classes

  def map(self, record: dict) -> dict:
    spectrogram = features.standardize(record["spectrogram"])
    return _example(record, crop(spectrogram, self._crop_frames), self._classes)


def create_dataset(data_config: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   seed: int, train: bool, num_epochs: Optional[int] = None,
                   shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                   drop_remainder: Optional[bool] = None) -> grain.DataLoader:
  """A Grain DataLoader of per-host batches of `split` (iterate it, or use `create_iterator`).

  `batch_size` is per host. This host reads shard `shard_index` of `shard_count` (default: the
  JAX process index and count): disjoint contiguous ranges of records covering the split.
  `train`: shuffled with `seed` (a new order every epoch) and random crops; otherwise the
  records in order and centre crops. `num_epochs=None` repeats forever. `drop_remainder`
  (default: `train`) drops the last partial batch of a finite pass. For multi-host evaluation
  use equal batch counts per host: `num_epochs=None` and a fixed number of batches.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size (per host) must be positive, got {batch_size}")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  builder = _builder(data_config)
  _check_split(builder, split)
  source = builder.as_data_source(split=split)
  classes = builder.info.features["labels"].feature.num_classes
  if len(source) < shard_count:
    raise ValueError(f"split {split!r} has {len(source)} records, fewer than the "
                     f"{shard_count} hosts reading it")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=False),
      shuffle=train, num_epochs=num_epochs, seed=seed)
  crop_op = (_TrainCrop if train else _EvalCrop)(data_config.crop_frames, classes)
  if data_config.num_workers > 0:
    worker_memory.start_tracker_in_own_session()
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[crop_op, grain.transforms.Batch(
          batch_size, drop_remainder=train if drop_remainder is None else drop_remainder)],
      worker_count=data_config.num_workers,
      worker_buffer_size=data_config.prefetch_buffer_size,
      read_options=grain.ReadOptions(num_threads=data_config.read_threads,
                                     prefetch_buffer_size=data_config.read_buffer_size))


def create_iterator(data_config: ml_collections.ConfigDict,
                    **kwargs: Any) -> grain.DataLoaderIterator:
  """`iter(create_dataset(...))`: a checkpointable iterator (`get_state` / `set_state`).

  Save it with Orbax as `ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it))`
  and restore into a fresh iterator with `grain.checkpoint.CheckpointRestore(it)`: the restored
  iterator yields exactly the batches the original would have yielded next.
  """
  return iter(create_dataset(data_config, **kwargs))


def make_global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-host NumPy batch -> global `jax.Array`s sharded over the batch axis.

  `sharding` (e.g. `NamedSharding(mesh, P(('data', 'fsdp')))`) partitions the leading axis;
  each host passes its own per-host batch. Non-numeric entries ('id') stay on the host and are
  left out.
  """
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()
          if np.issubdtype(np.asarray(value).dtype, np.number)}
