r"""Input pipeline throughput: 200 x 80 training crops per second, and per core, from log-mel shards.

    python benchmarks/input_pipeline.py [--data_dir=DIR] [--num_workers=N] [--batch_size=64] \
        [--batches=200] [--repeats=3] [--labelled] [--output_json=FILE]

Reads `audio_logmel` shards from --data_dir (built with audiomaepp.tools.prepare_dataset), or
builds the synthetic corpus (512 clips, labelled) into the cache on first use. Times the
pretraining iterator (shuffle, record decoding, standardised random crop, batching) with Grain
worker counts 0 and N, after a warm-up that absorbs worker start-up; with --labelled and
labelled shards, fine-tuning's iterator on the same shards too (`labelled.train_iterator`:
uniform and weighted sampling, multi-hot targets), and its per-core rate over pretraining's.
Per core is crops per CPU-second used by this process and its workers (Linux /proc), which a
machine shared with other jobs disturbs far less than the wall-clock rate; each figure is the
best of --repeats.
"""
import gc
import json
import os
import time

from absl import app
from absl import flags

from audiomaepp.data import labelled
from audiomaepp.data import pipeline
from audiomaepp import experiment

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir with audio_logmel shards "
                                "(default: the synthetic corpus).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Worker processes of the second measurement.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Per-host batch size.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches per measurement.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 10, "Untimed batches first.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Measurements per worker count (best is kept).")
_LABELLED = flags.DEFINE_bool("labelled", True, "Also time fine-tuning's labelled iterator "
                              "(when the shards have labels).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the numbers here.")


def _cpu_seconds() -> float:
  """CPU seconds used so far by this process and every live process below it (Linux)."""
  tick = os.sysconf("SC_CLK_TCK")
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:  # gone meanwhile
        continue
      children.setdefault(int(fields[1]), []).append((int(entry), fields))
  total, todo = 0.0, [os.getpid()]
  own = os.times()
  total += own.user + own.system
  while todo:
    for pid, fields in children.get(todo.pop(), []):
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
      todo.append(pid)
  return total


def _with_workers(data_config, num_workers: int):
  config = data_config.copy_and_resolve_references()
  config.num_workers = num_workers
  return config


def measure(make_iterator, num_workers: int) -> tuple[float, float]:
  """(crops per second, crops per CPU-second) from a fresh iterator `make_iterator(workers)`."""
  iterator = make_iterator(num_workers)
  for _ in range(_WARMUP.value):
    next(iterator)
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
  elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  assert batch["spectrogram"].shape == (_BATCH_SIZE.value, 200, 80)
  iterator.close()  # stops the worker processes before the next measurement
  gc.collect()
  crops = _BATCHES.value * _BATCH_SIZE.value
  return crops / elapsed, crops / cpu


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
             "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
             "samples_per_second": {}, "samples_per_cpu_second": {}}
  print(f"{dataset}: {num_train} training clips, batches of {_BATCH_SIZE.value} x 200 x 80")
  iterators = {"pretraining": lambda workers: pipeline.create_iterator(
      _with_workers(data_config, workers), split=data_config.train_split,
      batch_size=_BATCH_SIZE.value, seed=0, train=True)}
  if _LABELLED.value and pipeline.num_classes(data_config):
    # The same shards read as fine-tuning reads labelled TFDS shards.
    labelled_config = experiment.finetune_config().data
    labelled_config.source = "tfds"
    labelled_config.data_dir = os.path.dirname(os.path.dirname(dataset))
    split = labelled.open_labelled(labelled_config).load(data_config.train_split)
    for weighted in (False, True):
      iterators["fine-tuning, " + ("weighted" if weighted else "uniform")] = (
          lambda workers, weighted=weighted: labelled.train_iterator(
              split, _with_workers(labelled_config, workers), batch_size=_BATCH_SIZE.value,
              seed=0, weighted=weighted))
  for name, make_iterator in iterators.items():
    for workers in sorted({0, _NUM_WORKERS.value}):
      rates = [measure(make_iterator, workers) for _ in range(_REPEATS.value)]
      rate, per_core = max(r for r, _ in rates), max(c for _, c in rates)
      key = str(workers) if name == "pretraining" else f"{name}/{workers}"
      results["samples_per_second"][key] = rate
      results["samples_per_cpu_second"][key] = per_core
      line = (f"{name:<23} workers {workers:>2}: {rate:>8,.0f} crops/s  {per_core:>8,.0f} "
              "crops/s per core")
      if name != "pretraining":
        line += f"  ({per_core / results['samples_per_cpu_second'][str(workers)]:.2f} x "
        line += "pretraining per core)"
      print(line)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
