"""Labelled clips for fine-tuning and their batches.

Two sources (`open_labelled`): a HEAR 2021 task folder (`config.data.source='hear'`,
`config.data.task_dir`; single- or multi-label as its metadata says), whose splits are decoded
once into per-clip log-mels standardised per clip, as the HEAR API feeds the encoder; or the
TFDS shards `tools.prepare_dataset --labels_csv` writes from AudioSet's CSVs
(`config.data.source='tfds'`, `config.data.data_dir`; multi-label), whose clips stay on disk:
loading a split reads only the label index written beside the shards (`builders.LabelIndex`;
shards built without one have their labels read from every record, with a warning).

Labels are sparse (`Labels`: each clip's class indices); dense multi-hot targets exist per batch,
or for a whole split on demand (`LabelledSplit.targets`, for scoring evaluation splits).

Training batches (`train_iterator`) come from a Grain pipeline like pretraining's
(`pipeline.create_dataset`). Global position p of an endless stream picks a clip: the p-th row of
a stream of epoch permutations (Grain's shuffle, a new order every epoch) or, with weighted
sampling, a draw with probability proportional to `example_weights` (`WeightedSampler`: the
cumulative weights are computed once per split, each draw is a binary search); the clip is
cropped with Grain's generator of position p. Global batch b is positions b·B .. b·B + B - 1, so
it depends only on the dataset, the split, the seed, B, b and the sampling, never on the number
of hosts or of worker processes; each host reads only its block of rows, and a run resumes at
any batch index. Stored clips are read, decoded, cropped and batched in Grain worker processes
(`pipeline.num_workers`); decoded HEAR clips, already in memory, in this process.
"""
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

from absl import logging
import grain
import ml_collections
import numpy as np

from audiomaepp.audio import features
from audiomaepp.audio import io as audio_io
from audiomaepp.data import builders
from audiomaepp.data import pipeline
from audiomaepp.errors import UserError
from audiomaepp.evaluation import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class Labels:
  """Class lists of n clips: clip i's class indices are `classes[offsets[i]:offsets[i + 1]]`
  (`offsets` (n + 1,) int64, `classes` int32, each in [0, num_classes))."""
  offsets: np.ndarray
  classes: np.ndarray
  num_classes: int

  def __post_init__(self):
    offsets, classes = self.offsets, self.classes
    if (offsets.ndim != 1 or not offsets.size or offsets[0] != 0
        or offsets[-1] != classes.size or np.any(np.diff(offsets) < 0)):
      raise ValueError(f"label offsets must rise from 0 to the {classes.size} class indices")
    if classes.size and not 0 <= classes.min() <= classes.max() < self.num_classes:
      raise ValueError(f"class indices must be in [0, {self.num_classes}), got "
                       f"[{classes.min()}, {classes.max()}]")

  @classmethod
  def from_lists(cls, lists: Sequence[Sequence[int]], num_classes: int) -> "Labels":
    """From each clip's class indices."""
    offsets = np.zeros(len(lists) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, lists), np.int64, count=len(lists)), out=offsets[1:])
    classes = np.fromiter((c for row in lists for c in row), np.int32, count=int(offsets[-1]))
    return cls(offsets, classes, num_classes)

  @classmethod
  def concatenate(cls, parts: Sequence["Labels"]) -> "Labels":
    """The clips of `parts`, one after the other."""
    starts = np.cumsum([0] + [part.classes.size for part in parts])
    offsets = [part.offsets[1:] + start for part, start in zip(parts, starts)]
    return cls(np.concatenate([np.zeros(1, np.int64)] + offsets),
               np.concatenate([part.classes for part in parts]), parts[0].num_classes)

  def __len__(self) -> int:
    return self.offsets.size - 1

  def __getitem__(self, index: int) -> np.ndarray:
    """Class indices of clip `index`."""
    return self.classes[self.offsets[index]:self.offsets[index + 1]]

  @property
  def nbytes(self) -> int:
    return self.offsets.nbytes + self.classes.nbytes

  def counts(self) -> np.ndarray:
    """Clips per class (num_classes,)."""
    return np.bincount(self.classes, minlength=self.num_classes)

  def dense(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """Multi-hot targets (len(rows), num_classes) float32 of clips `rows` (default: all)."""
    rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
    starts, sizes = self.offsets[rows], np.diff(self.offsets)[rows]
    owner = np.repeat(np.arange(rows.size), sizes)
    positions = np.arange(owner.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    targets = np.zeros((rows.size, self.num_classes), np.float32)
    targets[owner, self.classes[np.repeat(starts, sizes) + positions]] = 1.0
    return targets


class _RecordClips(Sequence):
  """The clips of a split of TFDS shards, read from `source` (serialized records) when used."""
  in_memory = False

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    record = pipeline.decode_record(self._source[int(index)])
    return pipeline.standardized_crop(record, record["spectrogram"].shape[0])

  def example(self, index: int, crop_frames: int,
              rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
    """(standardised crop (crop_frames, mel) float32 (`pipeline.crop`: random with `rng`, else
    the centre), class indices) of clip `index`: the record's own labels, so that workers need
    no label index."""
    record = pipeline.decode_record(self._source[int(index)])
    return (pipeline.standardized_crop(record, crop_frames, rng),
            np.asarray(record["labels"], np.int64))


class _DecodedClips(Sequence):
  """Clips decoded into memory: per-clip standardised log-mels (frames, mel) and their labels."""
  in_memory = True

  def __init__(self, spectrograms: Sequence[np.ndarray], labels: Labels):
    self._spectrograms = spectrograms
    self._labels = labels

  def __len__(self) -> int:
    return len(self._spectrograms)

  def __getitem__(self, index: int) -> np.ndarray:
    return self._spectrograms[index]

  def example(self, index: int, crop_frames: int,
              rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
    """As `_RecordClips.example`."""
    return (pipeline.crop(self._spectrograms[index], crop_frames, rng).astype(np.float32),
            self._labels[index])


class _JoinedClips(Sequence):
  """Clip sequences (`_RecordClips`, `_DecodedClips`) one after the other, without copying."""

  def __init__(self, parts: list[Sequence]):
    self._parts = parts
    self._ends = np.cumsum([len(p) for p in parts])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def _locate(self, index: int) -> tuple[Sequence, int]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = int(np.searchsorted(self._ends, index, side="right"))
    return self._parts[part], index - (int(self._ends[part - 1]) if part else 0)

  def __getitem__(self, index: int) -> np.ndarray:
    part, index = self._locate(index)
    return part[index]

  @property
  def in_memory(self) -> bool:
    return all(part.in_memory for part in self._parts)

  def example(self, index: int, crop_frames: int,
              rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
    """As `_RecordClips.example`."""
    part, index = self._locate(index)
    return part.example(index, crop_frames, rng)


class _Ids(Sequence):
  """Record ids stored as bytes (`ids` (n,)), decoded when read."""

  def __init__(self, ids: np.ndarray):
    self.ids = ids

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def nbytes(self) -> int:
    return self.ids.nbytes

  def __getitem__(self, index: int | slice) -> str | list[str]:
    if isinstance(index, slice):
      return [name.decode() for name in self.ids[index]]
    return self.ids[index].decode()


def example_weights(labels: Labels) -> np.ndarray:
  """Sampling weight (n,) float64 of each clip for imbalanced multi-label sets: the sum over its
  labels of 1000 / (label count + 0.01), as AST's `gen_weight_file.py` (AudioMAE's
  `--weight_csv`)."""
  label_weight = 1000.0 / (labels.counts() + 0.01)
  owner = np.repeat(np.arange(len(labels)), np.diff(labels.offsets))
  return np.bincount(owner, weights=label_weight[labels.classes], minlength=len(labels))


class WeightedSampler(grain.transforms.RandomMap):
  """Global position -> a clip drawn with probability proportional to its `example_weights`.

  The cumulative weights are computed once; a draw is one uniform number from Grain's generator
  of the position and a binary search: O(log n).
  """

  def __init__(self, labels: Labels):
    self._cumulative = np.cumsum(example_weights(labels))
    if not self._cumulative.size or self._cumulative[-1] <= 0:
      raise UserError("weighted sampling needs clips with labels; this split has none")

  @property
  def nbytes(self) -> int:
    return self._cumulative.nbytes

  def draw(self, uniform: np.ndarray) -> np.ndarray:
    """Clips for uniform numbers in [0, 1)."""
    clips = np.searchsorted(self._cumulative, uniform * self._cumulative[-1], side="right")
    return np.minimum(clips, self._cumulative.size - 1)

  def random_map(self, position: int, rng: np.random.Generator) -> int:
    del position
    return int(self.draw(rng.random()))


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
  """One split: its clips (`spectrograms[i]`: clip i's per-clip standardised log-mel
  (frames, mel) float32, read when indexed), their labels and names (file names or record ids)."""
  spectrograms: Sequence[np.ndarray]  # _RecordClips, _DecodedClips or _JoinedClips
  labels: Labels
  files: Sequence[str]

  def __post_init__(self):
    if not len(self.spectrograms) == len(self.labels) == len(self.files):
      raise ValueError(f"{len(self.spectrograms)} clips, {len(self.labels)} label lists and "
                       f"{len(self.files)} names")

  @classmethod
  def decoded(cls, spectrograms: Sequence[np.ndarray], labels: Labels,
                files: Sequence[str]) -> "LabelledSplit":
    """A split of clips held in memory as per-clip standardised log-mels (frames, mel)."""
    return cls(_DecodedClips(spectrograms, labels), labels, files)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def targets(self) -> np.ndarray:
    """Dense multi-hot targets (n, classes) float32, built on each access: for scoring
    evaluation splits (AudioSet's eval: 20K x 527 floats), not for training splits."""
    return self.labels.dense()

  @functools.cached_property
  def sampler(self) -> WeightedSampler:
    """The weighted sampler of this split, computed on first use."""
    return WeightedSampler(self.labels)


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """A labelled dataset: its name, where it is, the class names, whether a clip may have several
  labels, its split names, how to load a split (`load`) and, for a task of folds, the
  {'train', 'valid', 'test': fold names} of each cross-validation run (as hear-eval-kit forms
  them: `tasks.data_splits`)."""
  name: str
  location: str
  vocabulary: list[str]
  multilabel: bool
  splits: list[str]
  loader: Callable[[str], LabelledSplit]
  folds: list[dict[str, list[str]]] = dataclasses.field(default_factory=list)

  def load(self, split: str) -> LabelledSplit:
    """Split `split`, or several joined in order ('fold00,fold01,fold02': cross-validation on a
    task of folds)."""
    names = split_names(split)
    for name in names:
      if name not in self.splits:
        raise UserError(f"split {name!r} is not a split of {self.location} (it has "
                        f"{self.splits})")
    parts = [self.loader(name) for name in names]
    if len(parts) == 1:
      return parts[0]
    files = (_Ids(np.concatenate([p.files.ids for p in parts]))
             if isinstance(parts[0].files, _Ids) else [f for p in parts for f in p.files])
    return LabelledSplit(_JoinedClips([p.spectrograms for p in parts]),
                         Labels.concatenate([p.labels for p in parts]), files)


def split_names(split: str) -> list[str]:
  """'fold00, fold01' -> ['fold00', 'fold01']."""
  return [name.strip() for name in split.split(",") if name.strip()]


def open_labelled(data_config: ml_collections.ConfigDict) -> LabelledSet:
  """The labelled dataset `config.data` names (`source` 'hear' or 'tfds'); reads no clip yet.

  Raises UserError naming the field: no task folder or data_dir, a missing folder, shards
  without labels, another source.
  """
  if data_config.source == "hear":
    if not data_config.task_dir:
      raise UserError("config.data.task_dir is not set: give a HEAR task folder "
                      "(--config.data.task_dir=DIR)")
    try:
      task = tasks_lib.read_hear_task(data_config.task_dir)
    except FileNotFoundError as e:
      raise UserError(f"config.data.task_dir: {e}") from None
    try:
      runs = tasks_lib.data_splits(task.metadata)
    except UserError:  # neither folds nor train / valid / test: the config names the splits
      runs = []
    return LabelledSet(task.name, str(task.task_dir), list(task.vocabulary),
                       task.metadata["prediction_type"] == "multilabel", sorted(task.splits),
                       lambda split: load_split(task, split), runs if len(runs) > 1 else [])
  if data_config.source == "tfds":
    location = pipeline.dataset_path(data_config)
    names = pipeline.class_names(data_config)
    if not names:
      raise UserError(f"{location} has no labels: build it with `python -m "
                      "audiomaepp.tools.prepare_dataset ... --segments_csv=... --labels_csv=...`")
    return LabelledSet(data_config.name, location, names, True,
                       sorted(pipeline.split_names(data_config)),
                       lambda split: load_records(data_config, split, len(names)))
  raise UserError(f"config.data.source={data_config.source!r}: fine-tuning reads a HEAR task "
                  "folder ('hear') or labelled TFDS shards ('tfds')")


def load_records(data_config: ml_collections.ConfigDict, split: str,
                 classes: int) -> LabelledSplit:
  """A split of labelled TFDS shards: its label index now, its clips when read."""
  location = pipeline.dataset_path(data_config)
  source = pipeline.record_source(data_config, split)
  index = builders.read_label_index(location, split)
  if index is None:
    logging.warning("%s has no label index of split %r: reading the labels of its %d records "
                    "(slow for large splits); run `python -m audiomaepp.tools.prepare_dataset` "
                    "again with the flags that built it to write the index", location, split,
                    len(source))
    index = builders.label_index_from_records(source)
  if len(index.ids) != len(source):
    raise UserError(f"{builders.label_index_path(location, split)} lists {len(index.ids)} clips, "
                    f"split {split!r} has {len(source)}: rebuild with `python -m "
                    "audiomaepp.tools.prepare_dataset ... --overwrite`")
  try:
    labels = Labels(index.offsets, index.classes, classes)
  except ValueError as e:
    raise UserError(f"{builders.label_index_path(location, split)}: {e}") from None
  return LabelledSplit(_RecordClips(source), labels, _Ids(index.ids))


def load_split(task: tasks_lib.HearTask, split: str) -> LabelledSplit:
  """Decodes and transforms the clips of `split` of a HEAR task (read by `tasks.read_hear_task`)."""
  if split not in task.splits:
    raise UserError(f"split {split!r} is not a split of {task.task_dir} (it has "
                    f"{sorted(task.splits)})")
  data = task.splits[split]
  if not data.files:
    raise UserError(f"split {split!r} of {task.task_dir} has no clips")
  index = {label: i for i, label in enumerate(task.vocabulary)}
  labels = Labels.from_lists([[index[label] for label in row] for row in data.labels],
                             len(task.vocabulary))
  spectrograms = []
  for path in data.paths:
    try:
      waveform = audio_io.load_audio(str(path))
      spectrograms.append(features.log_mel(waveform, normalize=True))
    except (audio_io.AudioError, ValueError) as e:
      raise UserError(f"{path}: {e}") from None
  return LabelledSplit.decoded(spectrograms, labels, list(data.files))


def train_rows(split: LabelledSplit, seed: int, weighted: bool = False) -> grain.MapDataset:
  """The clip (an index into `split`) at each global position of the training stream, forever.

  Uniform: epoch e is a permutation of the clips (Grain's shuffle, seeded by `seed` and e), so
  every clip is seen once per epoch. Weighted: independent draws by `split.sampler`, with
  Grain's generator of the position.
  """
  rows = grain.MapDataset.range(len(split)).seed(seed)
  if weighted:
    return rows.repeat().random_map(split.sampler)
  return rows.shuffle().repeat()


class _TrainExample(grain.transforms.RandomMap):
  """Clip index -> {'spectrogram': a standardised random crop (crop_frames, mel) float32,
  'targets': multi-hot (classes,) float32}."""

  def __init__(self, clips: Any, crop_frames: int, num_classes: int):
    self._clips = clips
    self._crop_frames = crop_frames
    self._num_classes = num_classes

  def random_map(self, clip: int, rng: np.random.Generator) -> dict:
    spectrogram, classes = self._clips.example(clip, self._crop_frames, rng)
    targets = np.zeros(self._num_classes, np.float32)
    targets[classes] = 1.0
    return {"spectrogram": spectrogram, "targets": targets}


def host_rows(block: tuple[int, int], batch_size: int) -> tuple[int, int]:
  """(first row, rows) of this host in a global batch, from `pipeline.host_block`'s (index,
  count of equal blocks)."""
  index, count = block
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible into {count} host blocks")
  rows = batch_size // count
  return index * rows, rows


def host_batches(split: LabelledSplit, crop_frames: int, batch_size: int, seed: int,
                 block: tuple[int, int], weighted: bool = False,
                 first_batch: int = 0) -> grain.MapDataset:
  """This host's rows (`block`: `pipeline.host_block`) of global training batches
  `first_batch`, `first_batch + 1`, ...: 'spectrogram' (rows, crop_frames, mel) float32 random
  crops and 'targets' (rows, classes) float32 multi-hot."""
  index, count = block
  _, rows = host_rows(block, batch_size)
  examples = train_rows(split, seed, weighted).random_map(
      _TrainExample(split.spectrograms, crop_frames, split.labels.num_classes))
  return examples.batch(rows, drop_remainder=True)[first_batch * count + index::count]


def train_iterator(split: LabelledSplit, data_config: ml_collections.ConfigDict, *,
                   batch_size: int, seed: int, first_batch: int = 0,
                   block: tuple[int, int] = (0, 1), weighted: bool = False,
                   num_classes: Optional[int] = None) -> grain.DatasetIterator:
  """Iterates over `host_batches` (crops of `data_config.crop_frames`), read ahead as
  pretraining's batches are: stored clips in `pipeline.num_workers(data_config)` Grain worker
  processes, clips in memory in this process. `num_classes`, when given, must be the split's.
  `close()` it to stop its worker processes."""
  if num_classes is not None and num_classes != split.labels.num_classes:
    raise ValueError(f"num_classes={num_classes}, but the split's labels have "
                     f"{split.labels.num_classes} classes")
  batches = host_batches(split, data_config.crop_frames, batch_size, seed, block, weighted,
                         first_batch)
  workers = 0 if split.spectrograms.in_memory else pipeline.num_workers(data_config)
  return iter(pipeline.read_ahead(batches, data_config, workers))


def eval_batches(split: LabelledSplit, crop_frames: int, batch_size: int,
                 block: tuple[int, int], crops: int = 1) -> Iterator[dict]:
  """Every clip once, in file order, as global batches of `batch_size` clips: 'spectrogram'
  (rows, crops, crop_frames, mel) float32, the clip's `pipeline.eval_crops` (one: the centre
  crop; short clips repeated along time); the last batch is padded with copies of clip 0 and
  'valid' (rows,) float32 marks the real rows. Yields this host's rows of each batch."""
  start, count = host_rows(block, batch_size)
  for first in range(0, len(split), batch_size):
    ids = np.arange(first, first + batch_size)
    valid = ids < len(split)
    ids = np.where(valid, ids, 0)[start:start + count]
    yield {"spectrogram": np.stack([pipeline.eval_crops(split.spectrograms[i], crop_frames,
                                                        crops) for i in ids]
                            ).astype(np.float32, copy=False),
           "targets": split.labels.dense(ids),
           "valid": valid[start:start + count].astype(np.float32)}
