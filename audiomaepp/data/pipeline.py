"""Grain input pipeline: log-mel shards -> global batches -> each host's rows -> one global array.

Per example (SPEC §2): the stored full-clip log-mel (float16) is standardised over the whole
clip (NumPy std, as the original training parser), then cropped to `crop_frames`: a random
offset in [0, T - crop_frames) for training (the original's `randint` range, so the last offset
is never drawn), the centre for evaluation. Clips shorter than `crop_frames` are first repeated
along time. (The original calls `np.tile(spec, k)` on a (time, mel) array, which tiles the last
axis -- frequency -- and yields an 80*k-bin spectrogram of the wrong shape: a bug, fixed here.)

Global batches. A split is one endless sequence of examples (`examples`): for training, shuffled
with `seed` in a new order every epoch, each random crop drawn from (seed, position); for
evaluation, the records in order. Global batch i is positions i*B .. (i+1)*B - 1, so it depends
only on (dataset, seed, B, i). A host materialises only its block of rows of each global batch
(`host_block` says which; `make_global_batch` puts them there), so neither the number of hosts
nor of Grain workers changes what is trained on, and there is no iterator state to save: a run
that resumes after step s reads from global batch s (`first_batch=s`), on any number of hosts.
Batches: `{'spectrogram': (rows, crop_frames, mel) float32, 'id': (rows,) bytes,
'labels': (rows, classes) float32 multi-hot (labelled datasets only)}`.
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
from audiomaepp.data import synthetic
from audiomaepp.data import worker_memory
from audiomaepp.errors import UserError

_PREPARE_HINT = ("build shards with `python -m audiomaepp.tools.prepare_dataset "
                 "--audio_dir=AUDIO --output_dir=DIR` and set config.data.data_dir=DIR, or use "
                 "config.data.source='synthetic' for the built-in corpus")


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  if data_config.source == "synthetic":
    return synthetic.dataset_dir(data_config.data_dir, data_config.synthetic_num_clips)
  if data_config.source == "tfds":
    if not data_config.data_dir:
      raise ValueError(f"config.data.data_dir is not set: {_PREPARE_HINT}")
    return data_config.data_dir
  raise ValueError(f"config.data.source must be 'tfds' or 'synthetic', got "
                   f"{data_config.source!r}")


def dataset_path(data_config: ml_collections.ConfigDict) -> str:
  """Directory of the built dataset (`<data_dir>/<name>/<latest version>`); reads only.

  Raises ValueError for an invalid source, FileNotFoundError when the dataset is not built (the
  synthetic corpus is built by `ensure_dataset`).
  """
  data_dir = _data_dir(data_config)
  root = os.path.join(data_dir, data_config.name)
  versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])
              if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    hint = ("it is built on first use by `ensure_dataset`" if data_config.source == "synthetic"
            else _PREPARE_HINT)
    raise FileNotFoundError(f"no built dataset {data_config.name!r} under {data_dir}: {hint}")
  latest = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
  return os.path.join(root, latest)


def ensure_dataset(data_config: ml_collections.ConfigDict) -> str:
  """`dataset_path`, after building the synthetic corpus if it is the source and not built yet
  (into `data_dir`, or ~/.cache/audiomaepp; concurrent callers are safe)."""
  if data_config.source == "synthetic":
    synthetic.build(data_config.data_dir, data_config.synthetic_num_clips)
  return dataset_path(data_config)


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


def examples(data_config: ml_collections.ConfigDict, *, split: str, seed: int,
             train: bool) -> grain.MapDataset:
  """Every example of `split` in the global order, repeated forever.

  `train`: each epoch shuffled with `seed` (a new order every epoch) and random crops seeded by
  (seed, position); otherwise the records in order and centre crops. Position j depends only on
  the dataset, `seed` and j.
  """
  builder = _builder(data_config)
  _check_split(builder, split)
  source = builder.as_data_source(split=split)
  if not len(source):
    raise UserError(f"split {split!r} of {builder.data_dir} has no records")
  classes = builder.info.features["labels"].feature.num_classes
  dataset = grain.MapDataset.source(source).seed(seed)
  if train:
    return dataset.shuffle().repeat().random_map(_TrainCrop(data_config.crop_frames, classes))
  return dataset.repeat().map(_EvalCrop(data_config.crop_frames, classes))


def host_block(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """(index, count): this host holds block `index` of `count` equal blocks of rows of every
  global batch of `batch_size` placed with `sharding` (the process index and count for a mesh
  whose devices are ordered by process; hosts holding replicas of a block share its index)."""
  slices = sharding.addressable_devices_indices_map((batch_size,)).values()
  rows = sorted({row for index in slices for row in range(*index[0].indices(batch_size))})
  if rows != list(range(rows[0], rows[0] + len(rows))) or rows[0] % len(rows):
    raise ValueError(f"process {jax.process_index()} holds rows {rows[:8]}... of the global "
                     "batch: expected one contiguous block (a mesh whose devices are ordered "
                     "by process)")
  return rows[0] // len(rows), batch_size // len(rows)


def create_dataset(data_config: ml_collections.ConfigDict, *, split: str, batch_size: int,
                   seed: int, train: bool, first_batch: int = 0,
                   num_batches: Optional[int] = None, shard_index: Optional[int] = None,
                   shard_count: Optional[int] = None) -> grain.IterDataset:
  """This host's rows of global batches `first_batch`, `first_batch + 1`, ... of `split`.

  `batch_size` is global. The host reads block `shard_index` of `shard_count` of each batch
  (default: the JAX process index and count; see `host_block`). `num_batches`: only that many
  global batches, repeated forever (a fixed evaluation set, read by one iterator whose workers
  stay). With `data_config.num_workers` > 0, Grain worker processes make the batches; the
  batches are the same for any worker count.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if batch_size <= 0 or batch_size % shard_count:
    raise UserError(f"batch size {batch_size} is not a positive multiple of the "
                    f"{shard_count} hosts reading it")
  dataset = examples(data_config, split=split, seed=seed, train=train)
  dataset = dataset.batch(batch_size // shard_count, drop_remainder=True)[
      first_batch * shard_count + shard_index::shard_count]
  if num_batches is not None:
    dataset = dataset[:num_batches].repeat(reseed_each_epoch=False)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer_size))
  if data_config.num_workers > 0:
    worker_memory.start_tracker_in_own_session()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.num_workers,
                                     per_worker_buffer_size=data_config.prefetch_buffer_size),
        worker_init_fn=_start_worker)
  return dataset


def _start_worker(worker_index: int, worker_count: int) -> None:
  """Runs in each Grain worker process before it makes batches (see worker_memory)."""
  del worker_index, worker_count
  worker_memory.register_names_before_creation()


def create_iterator(data_config: ml_collections.ConfigDict,
                    **kwargs: Any) -> grain.DatasetIterator:
  """`iter(create_dataset(...))`; `close()` it to stop its worker processes."""
  return iter(create_dataset(data_config, **kwargs))


def make_global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Each host's rows (NumPy) -> global `jax.Array`s sharded over the batch axis.

  `sharding` (e.g. `NamedSharding(mesh, P(('data', 'fsdp')))`) partitions the leading axis;
  each host passes its block of rows (`host_block`). Non-numeric entries ('id') stay on the host
  and are left out.
  """
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()
          if np.issubdtype(np.asarray(value).dtype, np.number)}
