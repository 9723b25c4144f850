r"""Input pipeline throughput: samples/s of 200 x 80 training crops read from log-mel shards.

    python benchmarks/input_pipeline.py [--data_dir=DIR] [--num_workers=N] [--batch_size=64] \
        [--batches=200] [--output_json=FILE]

Reads `audio_logmel` shards from --data_dir (built with audiomaepp.tools.prepare_dataset), or
builds the synthetic corpus (512 clips) into the cache on first use. Times the training
iterator (shuffle, per-clip standardisation, random crop, batching) with Grain worker counts 0
and N, after a warm-up that absorbs worker start-up.
"""
import gc
import json
import os
import time

from absl import app
from absl import flags

from audiomaepp.data import pipeline
from audiomaepp import experiment

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir with audio_logmel shards "
                                "(default: the synthetic corpus).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Worker processes of the second measurement.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Per-host batch size.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches per measurement.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 10, "Untimed batches first.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the numbers here.")


def samples_per_second(data_config, num_workers: int) -> float:
  """Training crops per second from a fresh iterator with `num_workers` Grain workers."""
  config = data_config.copy_and_resolve_references()
  config.num_workers = num_workers
  iterator = pipeline.create_iterator(config, split=config.train_split,
                                      batch_size=_BATCH_SIZE.value, seed=0, train=True)
  for _ in range(_WARMUP.value):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  assert batch["spectrogram"].shape == (_BATCH_SIZE.value, config.crop_frames, 80)
  del iterator
  gc.collect()  # stops the worker processes before the next measurement
  return _BATCHES.value * _BATCH_SIZE.value / elapsed


def main(argv):
  del argv
  data_config = experiment.data_config()
  if _DATA_DIR.value:
    data_config.data_dir = _DATA_DIR.value
  else:
    data_config.source = "synthetic"
  dataset = pipeline.ensure_dataset(data_config)
  num_train = pipeline.num_examples(data_config, data_config.train_split)
  results = {"dataset": dataset, "train_examples": num_train, "batch_size": _BATCH_SIZE.value,
             "cpu_count": os.cpu_count(), "samples_per_second": {}}
  print(f"{dataset}: {num_train} training clips, batches of {_BATCH_SIZE.value} x 200 x 80")
  for workers in sorted({0, _NUM_WORKERS.value}):
    rate = samples_per_second(data_config, workers)
    results["samples_per_second"][str(workers)] = rate
    print(f"workers {workers:>2}: {rate:>10,.0f} samples/s")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
