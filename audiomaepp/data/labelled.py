"""Labelled clips for fine-tuning, read from a HEAR 2021 task folder, and their batches.

Each split is decoded once into per-clip log-mels (standardised per clip, as the HEAR API feeds
the encoder) and multi-hot targets over the task's vocabulary. Global batches depend only on the
seed, the split, the batch size and the batch index (never on the number of hosts): batch b
takes the rows b·B .. b·B + B - 1 of a stream of epoch permutations (or, with weighted
sampling, B draws with replacement), and row r of batch b is cropped with its own generator
seeded by (seed, b, r). Each host builds only its block of rows.
"""
import dataclasses
from collections.abc import Iterator

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
  """One split: per-clip standardised log-mels (frames, mel), targets (n, classes) float32."""
  spectrograms: list[np.ndarray]
  targets: np.ndarray
  files: list[str]

  def __len__(self) -> int:
    return len(self.spectrograms)


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
