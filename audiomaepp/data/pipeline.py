"""Grain input pipeline: log-mel shards -> global batches -> each host's rows -> one global array.

Per example (docs/reference.md#data): the stored full-clip log-mel (float16) is standardised over the whole
clip (NumPy std, as the original training parser; the shards store each clip's mean and std, so
only the crop is converted and standardised), then cropped to `crop_frames`: a random
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
from tensorflow_datasets.proto import tf_example_pb2

from audiomaepp.audio import features
from audiomaepp.data import real
from audiomaepp.data import rich
from audiomaepp.data import synthetic
from audiomaepp.data import worker_memory
from audiomaepp.errors import UserError

_PREPARE_HINT = ("build shards with `python -m audiomaepp.tools.prepare_dataset "
                 "--audio_dir=AUDIO --output_dir=DIR` and set config.data.data_dir=DIR, or use "
                 "config.data.source='synthetic' for the built-in corpus")


# The built-in corpora, built on first use by `ensure_dataset`.
BUILT_IN = {"synthetic": synthetic, "rich": rich, "real": real}


def _data_dir(data_config: ml_collections.ConfigDict) -> str:
  if data_config.source in BUILT_IN:
    return BUILT_IN[data_config.source].dataset_dir(data_config.data_dir,
                                                     data_config.synthetic_num_clips)
  if data_config.source == "tfds":
    if not data_config.data_dir:
      raise UserError(f"config.data.data_dir is not set: {_PREPARE_HINT}")
    return data_config.data_dir
  raise UserError(f"config.data.source must be 'tfds', 'synthetic', 'rich' or 'real', got "
                   f"{data_config.source!r}")


def dataset_path(data_config: ml_collections.ConfigDict) -> str:
  """Directory of the built dataset (`<data_dir>/<name>/<latest version>`); reads only.

  Raises UserError for an invalid source, or when the dataset is not built (the built-in corpora
  are built by `ensure_dataset`).
  """
  data_dir = _data_dir(data_config)
  root = os.path.join(data_dir, data_config.name)
  versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])
              if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
  if not versions:
    hint = ("it is built on first use by `ensure_dataset`" if data_config.source in BUILT_IN
            else _PREPARE_HINT)
    raise UserError(f"no built dataset {data_config.name!r} under {data_dir}: {hint}")
  latest = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
  return os.path.join(root, latest)


def ensure_dataset(data_config: ml_collections.ConfigDict) -> str:
  """`dataset_path`, after building the built-in corpus ('synthetic', 'rich' or 'real') if it is the source
  and not built yet (into `data_dir`, or ~/.cache/audiomaepp; concurrent callers are safe)."""
  if data_config.source in BUILT_IN:
    BUILT_IN[data_config.source].build(data_config.data_dir, data_config.synthetic_num_clips)
  return dataset_path(data_config)


def _builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  # Read from the directory alone: no builder class (or its build inputs) needed.
  return tfds.builder_from_directory(dataset_path(data_config))


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  if split not in builder.info.splits:
    raise UserError(f"split {split!r} not in {builder.data_dir}; it has "
                     f"{sorted(builder.info.splits.keys())}")


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of clips in `split` (all hosts together)."""
  builder = _builder(data_config)
  _check_split(builder, split)
  return builder.info.splits[split].num_examples


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of label classes of the dataset (0 for unlabelled folders)."""
  return _builder(data_config).info.features["labels"].feature.num_classes


def split_names(data_config: ml_collections.ConfigDict) -> list[str]:
  """The splits of the built dataset."""
  return list(_builder(data_config).info.splits.keys())


def class_names(data_config: ml_collections.ConfigDict) -> list[str]:
  """The label classes' names, in index order (empty for unlabelled folders)."""
  return list(_builder(data_config).info.features["labels"].feature.names)


def record_source(data_config: ml_collections.ConfigDict, split: str) -> Any:
  """Random access to the serialized records of `split` (`decode_record` reads one)."""
  return _record_source(_builder(data_config), split)


def _record_source(builder: tfds.core.DatasetBuilder, split: str) -> Any:
  _check_split(builder, split)
  source = builder.as_data_source(split=split,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  if not len(source):
    raise UserError(f"split {split!r} of {builder.data_dir} has no records")
  return source


# What launchers set to the number of processes sharing a machine (SLURM with
# --ntasks-per-node, Open MPI, torchrun-style launchers).
LOCAL_PROCESS_COUNT_VARS = ("SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                            "LOCAL_WORLD_SIZE")


def process_cpu_share() -> int:
  """The CPU cores this process may use: SLURM_CPUS_PER_TASK when set; else its affinity mask
  when that is narrower than the machine (a launcher bound it); else the machine's cores shared
  equally among the processes on it, as the launcher's local process count says."""
  slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
  if slurm.isdigit() and int(slurm) > 0:
    return int(slurm)
  cores = len(os.sched_getaffinity(0))
  if cores < (os.cpu_count() or cores):
    return cores
  for name in LOCAL_PROCESS_COUNT_VARS:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 0:
      return max(1, cores // int(value))
  return cores


def num_workers(data_config: ml_collections.ConfigDict) -> int:
  """Grain worker processes per host: `data_config.num_workers`, where -1 (auto) is all but two
  of this process's share of the cores (`process_cpu_share`) when JAX runs on an accelerator,
  and 0 (the main process) on CPU."""
  requested = data_config.num_workers
  if requested >= 0:
    return requested
  if requested != -1:
    raise UserError(f"config.data.num_workers must be -1 (auto) or >= 0, got {requested}")
  if jax.default_backend() == "cpu":
    return 0
  return max(0, process_cpu_share() - 2)


def _repeated_to(spectrogram: np.ndarray, frames: int) -> np.ndarray:
  """The clip repeated along time (whole repeats) to at least `frames` frames."""
  if spectrogram.shape[0] >= frames:
    return spectrogram
  return np.tile(spectrogram, (math.ceil(frames / spectrogram.shape[0]), 1))


def crop(spectrogram: np.ndarray, crop_frames: int,
         rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """`(time, mel)` -> `(crop_frames, mel)`: random offset with `rng`, else the centre.

  Clips shorter than `crop_frames` are repeated along time first (not along mel, as the
  original's `np.tile(spec, k)` does).
  """
  spectrogram = _repeated_to(spectrogram, crop_frames)
  frames = spectrogram.shape[0]
  if frames == crop_frames:
    offset = 0
  elif rng is None:
    offset = (frames - crop_frames) // 2
  else:
    offset = int(rng.integers(0, frames - crop_frames))
  return spectrogram[offset:offset + crop_frames]


def eval_crops(spectrogram: np.ndarray, crop_frames: int, count: int) -> np.ndarray:
  """`(time, mel)` -> `(count, crop_frames, mel)`: `count` crops evenly spaced from the start of
  the clip to its end (one: the centre crop of `crop`), so that together they cover a clip of up
  to `count` crops. Short clips are repeated along time first, as in `crop`."""
  if count == 1:
    return crop(spectrogram, crop_frames)[None]
  spectrogram = _repeated_to(spectrogram, crop_frames)
  free = spectrogram.shape[0] - crop_frames
  return np.stack([spectrogram[i * free // (count - 1):][:crop_frames] for i in range(count)])


def decode_record(serialized: bytes) -> dict:
  """A serialized `audio_logmel` record -> `spectrogram` (a float16 view of the stored bytes),
  `mean`, `std` (float32; None in version 1.0.0 shards, which lack them), `id`, `labels`.

  Parses with the protocol buffer TFDS writes (`tf.train.Example`, without TensorFlow) and copies
  nothing: the crop decides which frames become float32.
  """
  feature = tf_example_pb2.Example.FromString(serialized).features.feature
  moments = [feature[k].float_list.value[0] if k in feature else None for k in ("mean", "std")]
  return {"spectrogram": np.frombuffer(feature["spectrogram"].bytes_list.value[0],
                                       np.float16).reshape(-1, features.N_MELS),
          "mean": moments[0], "std": moments[1],
          "id": feature["id"].bytes_list.value[0],
          "labels": feature["labels"].int64_list.value}


def standardized_crop(record: dict, crop_frames: int,
                      rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """The crop (`crop`) of the record's clip standardised with the clip's mean and std, as float32.

  Equal to `crop(features.standardize(clip))`: only the crop's frames are converted.
  """
  spectrogram, mean, std = record["spectrogram"], record["mean"], record["std"]
  if mean is None:  # version 1.0.0 shards: the moments of the whole clip, here
    mean, std = features.moments(spectrogram)
  else:
    mean, std = np.float32(mean), np.float32(std)
  return (crop(spectrogram, crop_frames, rng).astype(np.float32) - mean) / (std + features.STD_EPS)


class _Crop(grain.transforms.RandomMap):
  """Serialized record -> example: a standardised random crop when `train`, else the centre crop
  (Grain seeds `rng` per record and epoch)."""

  def __init__(self, crop_frames: int, classes: int, train: bool):
    self._crop_frames = crop_frames
    self._classes = classes
    self._train = train

  def random_map(self, serialized: bytes, rng: np.random.Generator) -> dict:
    record = decode_record(serialized)
    spectrogram = standardized_crop(record, self._crop_frames, rng if self._train else None)
    example = {"spectrogram": spectrogram, "id": np.bytes_(record["id"])}
    if self._classes:
      multi_hot = np.zeros(self._classes, np.float32)
      multi_hot[np.asarray(record["labels"], np.int64)] = 1.0
      example["labels"] = multi_hot
    return example


def examples(data_config: ml_collections.ConfigDict, *, split: str, seed: int,
             train: bool) -> grain.MapDataset:
  """Every example of `split` in the global order, repeated forever.

  `train`: each epoch shuffled with `seed` (a new order every epoch) and random crops seeded by
  (seed, position); otherwise the records in order and centre crops. Position j depends only on
  the dataset, `seed` and j.
  """
  builder = _builder(data_config)
  source = _record_source(builder, split)
  classes = builder.info.features["labels"].feature.num_classes
  dataset = grain.MapDataset.source(source).seed(seed)
  if train:
    dataset = dataset.shuffle()
  return dataset.repeat().random_map(_Crop(data_config.crop_frames, classes, train))


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
  return read_ahead(dataset, data_config, num_workers(data_config))


def read_ahead(dataset: grain.MapDataset, data_config: ml_collections.ConfigDict,
               workers: int) -> grain.IterDataset:
  """`dataset` (of host batches) read with `data_config.read_threads` threads and
  `read_buffer_size` batches ahead per process, in `workers` Grain worker processes (0: this
  process) that buffer `prefetch_buffer_size` batches each."""
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer_size))
  if workers > 0:
    worker_memory.start_tracker_in_own_session()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
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
