"""Labelled clips for fine-tuning and their batches.

Two sources (`open_labelled`): a HEAR 2021 task folder (`config.data.source='hear'`,
`config.data.task_dir`; single- or multi-label as its metadata says), whose splits are decoded
once into per-clip log-mels standardised per clip, as the HEAR API feeds the encoder; or the
TFDS shards `tools.prepare_dataset --labels_csv` writes from AudioSet's CSVs
(`config.data.source='tfds'`, `config.data.data_dir`; multi-label), whose clips stay on disk and
are read per batch (only their labels are read at the start, in one pass over the split). Targets
are multi-hot over the classes. Global batches depend only on the
seed, the split, the batch size and the batch index (never on the number of hosts): batch b
takes the rows b·B .. b·B + B - 1 of a stream of epoch permutations (or, with weighted
sampling, B draws with replacement), and row r of batch b is cropped with its own generator
seeded by (seed, b, r). Each host builds only its block of rows.
"""
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from audiomaepp.audio import features
from audiomaepp.audio import io as audio_io
from audiomaepp.data import pipeline
from audiomaepp.errors import UserError
from audiomaepp.evaluation import tasks as tasks_lib

# Streams of the generators that draw batches, so that they never coincide.
_PERMUTATION_STREAM, _WEIGHTED_STREAM, _CROP_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
  """One split: per-clip standardised log-mels (frames, mel), targets (n, classes) float32, and
  the clips' names (file names or record ids)."""
  spectrograms: Sequence[np.ndarray]
  targets: np.ndarray
  files: list[str]

  def __len__(self) -> int:
    return len(self.spectrograms)


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
    return LabelledSplit(_Joined([p.spectrograms for p in parts]),
                         np.concatenate([p.targets for p in parts]),
                         [f for p in parts for f in p.files])


def split_names(split: str) -> list[str]:
  """'fold00, fold01' -> ['fold00', 'fold01']."""
  return [name.strip() for name in split.split(",") if name.strip()]


class _Joined(Sequence):
  """Sequences one after the other, without copying them."""

  def __init__(self, parts: list[Sequence]):
    self._parts = parts
    self._ends = np.cumsum([len(p) for p in parts])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = int(np.searchsorted(self._ends, index, side="right"))
    return self._parts[part][index - (int(self._ends[part - 1]) if part else 0)]


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


class _StoredSpectrograms(Sequence):
  """The clips of a split of TFDS shards, read and standardised when indexed."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    record = pipeline.decode_record(self._source[int(index)])
    return pipeline.standardized_crop(record, record["spectrogram"].shape[0])


def load_records(data_config: ml_collections.ConfigDict, split: str,
                 classes: int) -> LabelledSplit:
  """A split of labelled TFDS shards: its labels now (one pass), its clips when indexed."""
  source = pipeline.record_source(data_config, split)
  targets = np.zeros((len(source), classes), np.float32)
  ids = []
  for row in range(len(source)):
    record = pipeline.decode_record(source[row])
    targets[row, np.asarray(record["labels"], np.int64)] = 1.0
    ids.append(record["id"].decode())
  return LabelledSplit(_StoredSpectrograms(source), targets, ids)


def load_split(task: tasks_lib.HearTask, split: str) -> LabelledSplit:
  """Decodes and transforms the clips of `split` of a HEAR task (read by `tasks.read_hear_task`)."""
  if split not in task.splits:
    raise UserError(f"split {split!r} is not a split of {task.task_dir} (it has "
                    f"{sorted(task.splits)})")
  data = task.splits[split]
  if not data.files:
    raise UserError(f"split {split!r} of {task.task_dir} has no clips")
  index = {label: i for i, label in enumerate(task.vocabulary)}
  targets = np.zeros((len(data.files), len(task.vocabulary)), np.float32)
  for row, labels in enumerate(data.labels):
    targets[row, [index[label] for label in labels]] = 1.0
  spectrograms = []
  for path in data.paths:
    try:
      waveform = audio_io.load_audio(str(path))
      spectrograms.append(features.log_mel(waveform, normalize=True))
    except (audio_io.AudioError, ValueError) as e:
      raise UserError(f"{path}: {e}") from None
  return LabelledSplit(spectrograms, targets, list(data.files))


def example_weights(targets: np.ndarray) -> np.ndarray:
  """Sampling weight of each example for imbalanced multi-label sets: the sum over its labels
  of 1000 / (label count + 0.01), as AST's `gen_weight_file.py` (AudioMAE's `--weight_csv`)."""
  label_weight = 1000.0 / (targets.sum(axis=0) + 0.01)
  return (targets * label_weight).sum(axis=1)


def batch_rows(num_examples: int, batch_size: int, seed: int, batch_index: int,
               weights: np.ndarray | None = None) -> np.ndarray:
  """Example indices (batch_size,) of global batch `batch_index`.

  Uniform: consecutive rows of a stream of permutations (epoch e shuffled by (seed, e)), so
  every example is seen once per epoch. Weighted: draws with replacement with probability
  proportional to `weights`, from a generator seeded by (seed, batch_index).
  """
  if weights is not None:
    rng = np.random.default_rng([seed, _WEIGHTED_STREAM, batch_index])
    return rng.choice(num_examples, batch_size, p=weights / weights.sum())
  positions = batch_index * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  rows = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, _PERMUTATION_STREAM, int(epoch)]).permutation(
        num_examples)
    rows[epochs == epoch] = order[offsets[epochs == epoch]]
  return rows


def host_rows(block: tuple[int, int], batch_size: int) -> tuple[int, int]:
  """(first row, rows) of this host in a global batch, from `pipeline.host_block`'s (index,
  count of equal blocks)."""
  index, count = block
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible into {count} host blocks")
  rows = batch_size // count
  return index * rows, rows


def train_batch(split: LabelledSplit, crop_frames: int, batch_size: int, seed: int,
                batch_index: int, block: tuple[int, int], weighted: bool = False) -> dict:
  """This host's rows (`block`: `pipeline.host_block`) of training batch `batch_index`:
  'spectrogram' (rows, crop_frames, mel) float32 random crops and 'targets' (rows, classes)."""
  weights = example_weights(split.targets) if weighted else None
  rows = batch_rows(len(split), batch_size, seed, batch_index, weights)
  start, count = host_rows(block, batch_size)
  crops = [pipeline.crop(split.spectrograms[rows[r]], crop_frames,
                         np.random.default_rng([seed, _CROP_STREAM, batch_index, r]))
           for r in range(start, start + count)]
  return {"spectrogram": np.stack(crops).astype(np.float32),
          "targets": split.targets[rows[start:start + count]]}


def eval_batches(split: LabelledSplit, crop_frames: int, batch_size: int,
                 block: tuple[int, int]) -> Iterator[dict]:
  """Every clip once, in file order, as global batches of `batch_size` (centre crops; short
  clips repeated along time); the last batch is padded with copies of clip 0 and 'valid'
  (rows,) float32 marks the real rows. Yields this host's rows of each batch."""
  start, count = host_rows(block, batch_size)
  for first in range(0, len(split), batch_size):
    ids = np.arange(first, first + batch_size)
    valid = ids < len(split)
    ids = np.where(valid, ids, 0)[start:start + count]
    yield {"spectrogram": np.stack([pipeline.crop(split.spectrograms[i], crop_frames)
                                    for i in ids]).astype(np.float32),
           "targets": split.targets[ids],
           "valid": valid[start:start + count].astype(np.float32)}
