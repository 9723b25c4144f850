r"""Fine-tuning's start on AudioSet-2M's labels: host memory, time to the first batch, sampler rate.

    python benchmarks/labelled_scale.py [--clips=2000000] [--classes=527] [--mean_labels=2.7] \
        [--batch_size=1024] [--draws=200000] [--output_json=FILE]

Builds, in a temporary folder, a labelled dataset of metadata only: the dataset info of one
'train' split of --clips records (no shards, no spectrograms) and its label index, written by the
code `prepare_dataset --labels_csv` uses (`builders.label_index`, `builders.write_label_index`).
Labels are shaped like AudioSet's: each clip has 1 + Poisson(mean_labels - 1) classes drawn from
a Zipf law over the classes (repeats dropped), so the commonest classes have hundreds of
thousands of clips and most a few thousand. Then times what fine-tuning does before its first
batch: `labelled.open_labelled`, `LabelledSet.load('train')` and the clip indices of the first
weighted batch (`labelled.train_rows`, which builds the sampler), and the rate of further draws.
The last line printed is
`labels_mb=<memory held after the first batch: labels, ids, sampler> startup_s=<open to the first
batch's clip indices> sampler_indices_per_s=<draws per second>`.
"""
import json
import os
import tempfile
import time
import tracemalloc
from typing import Any

from absl import app
from absl import flags
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from audiomaepp import experiment
from audiomaepp.data import builders
from audiomaepp.data import labelled
from audiomaepp.data import sources

_CLIPS = flags.DEFINE_integer("clips", 2_000_000, "Clips in the 'train' split.")
_CLASSES = flags.DEFINE_integer("classes", 527, "Classes.")
_MEAN_LABELS = flags.DEFINE_float("mean_labels", 2.7, "Mean labels drawn per clip (before "
                                  "repeated classes are dropped).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Global batch size.")
_DRAWS = flags.DEFINE_integer("draws", 200_000, "Sampler draws timed after the first batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic labels.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the numbers here.")

_SHARDS = 1024  # as many shards as a real build of this size would have; none is written


def synthetic_labels(clips: int, classes: int, mean_labels: float,
                     seed: int) -> list[np.ndarray]:
  """Each clip's sorted class indices, AudioSet-shaped (see the module docstring)."""
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, classes + 1)
  sizes = 1 + rng.poisson(mean_labels - 1, clips)
  drawn = rng.choice(classes, size=int(sizes.sum()), p=popularity / popularity.sum())
  pairs = np.unique(np.repeat(np.arange(clips), sizes).astype(np.int64) * classes + drawn)
  owner, label = np.divmod(pairs, classes)
  ends = np.searchsorted(owner, np.arange(clips), side="right")
  return np.split(label, ends[:-1])


def write_dataset(data_dir: str, labels: list[np.ndarray], classes: int) -> str:
  """A dataset of `labels` ('train' split) with its info and label index but no shards; returns
  its data_dir."""
  audio_dir = os.path.join(data_dir, "inputs")
  os.makedirs(audio_dir)
  labels_csv = os.path.join(audio_dir, "class_labels_indices.csv")
  with open(labels_csv, "w") as f:
    f.write("index,mid,display_name\n" + "".join(f"{c},/m/{c:05d},class {c}\n"
                                                 for c in range(classes)))
  segments_csv = os.path.join(audio_dir, "train_segments.csv")  # the info reads no segment
  with open(segments_csv, "w") as f:
    f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
  inputs = sources.Sources(audio_dir, segments_csvs=(("train", segments_csv),),
                           labels_csv=labels_csv)
  path = builders.dataset_dir(data_dir)
  os.makedirs(path)
  info = builders.AudioLogmel(sources=inputs, data_dir=data_dir,
                              file_format="array_record").info
  template = tfds.core.ShardedFileTemplate(data_dir=epath.Path(path), dataset_name=builders.NAME,
                                           split="train", filetype_suffix="array_record")
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train",
      shard_lengths=[part.size for part in np.array_split(np.arange(len(labels)),
                                                          min(_SHARDS, len(labels)))],
      num_bytes=0, filename_template=template)]))
  info.write_to_directory(path)
  records = [(f"{i:011d}", row.tolist()) for i, row in enumerate(labels)]
  builders.write_label_index(path, "train", builders.label_index("train", records))
  return data_dir


def _open_to_first_batch(data_dir: str, batch_size: int) -> tuple[Any, Any, list[int]]:
  """What fine-tuning does before its first weighted batch: (split, rows, first batch's clips)."""
  config = experiment.finetune_config().data
  config.source, config.data_dir = "tfds", data_dir
  split = labelled.open_labelled(config).load("train")
  rows = labelled.train_rows(split, seed=0, weighted=True)
  return split, rows, [rows[i] for i in range(batch_size)]


def measure(data_dir: str, batch_size: int, draws: int) -> dict:
  """Seconds from open to the first batch's clips and the sampler's rate; then, in a second
  open traced by tracemalloc, the memory it holds after the first batch and its peak."""
  start = time.perf_counter()
  split, rows, first_batch = _open_to_first_batch(data_dir, batch_size)
  startup_s = time.perf_counter() - start
  start = time.perf_counter()
  drawn = [rows[i] for i in range(batch_size, batch_size + draws)]
  draw_s = time.perf_counter() - start
  del split, rows
  tracemalloc.start()
  try:
    held = _open_to_first_batch(data_dir, batch_size)
    held_bytes, peak_bytes = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  split = held[0]
  return {"clips": len(split), "labels": int(split.labels.classes.size),
          "labels_mb": held_bytes / 2**20, "peak_mb": peak_bytes / 2**20,
          "arrays_mb": (split.labels.nbytes + split.files.nbytes + split.sampler.nbytes) / 2**20,
          "startup_s": startup_s, "sampler_indices_per_s": draws / draw_s,
          "first_batch": first_batch, "drawn": drawn}


def main(argv):
  del argv
  labels = synthetic_labels(_CLIPS.value, _CLASSES.value, _MEAN_LABELS.value, _SEED.value)
  with tempfile.TemporaryDirectory() as data_dir:
    write_dataset(data_dir, labels, _CLASSES.value)
    result = measure(data_dir, _BATCH_SIZE.value, _DRAWS.value)
  counts = np.bincount(np.concatenate(labels), minlength=_CLASSES.value)
  print(f"{result['clips']:,} clips, {result['labels'] / result['clips']:.2f} labels per clip, "
        f"clips per class: max {counts.max():,}, median {int(np.median(counts)):,}, "
        f"min {counts.min():,}; load {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"{os.cpu_count()} cores")
  print(f"memory held after the first batch {result['labels_mb']:.1f} MB (label, id and sampler "
        f"arrays {result['arrays_mb']:.1f} MB), peak while opening {result['peak_mb']:.1f} MB")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({k: v for k, v in result.items() if k not in ("first_batch", "drawn")}, f,
                indent=2)
  print(f"labels_mb={result['labels_mb']:.1f} startup_s={result['startup_s']:.2f} "
        f"sampler_indices_per_s={result['sampler_indices_per_s']:.0f}")


if __name__ == "__main__":
  app.run(main)
