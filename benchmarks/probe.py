r"""Wall time of the HEAR probe: all seeds x grid points of one generated task in one program.

    python benchmarks/probe.py [--per_class=30] [--seeds=10] [--dim=960] [--output_json=FILE]

Generates the keyword-spotting task with ../shared/evalsuite/make_suite.py (a generator of small
HEAR-format tasks kept outside the repository), or reads --tasks_dir/kws-v1; embeds every clip
as the means of its log-mel spectrogram (docs/reference.md#features) over dim / 80 time
segments (960 = the width of AudioMAE++ Tiny features), then times `probe.train_probes` with the
paper's protocol: the first call (compilation + training) and a second call (training only).
"""
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from audiomaepp import audio
from audiomaepp.evaluation import probe
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks

_MAKE_SUITE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "evalsuite" / "make_suite.py"
_TASKS_DIR = flags.DEFINE_string(
    "tasks_dir", None, "Existing suite with kws-v1 (default: generate one).")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Clips per class when generating the task.")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Seeds per grid point.")
_DIM = flags.DEFINE_integer("dim", 960, "Embedding size (a multiple of 80).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the numbers here.")


def logmel_segment_means(path: pathlib.Path, segments: int) -> np.ndarray:
  """(segments * 80,) means of the clip's log-mel over equal time segments."""
  logmel = audio.log_mel(audio.load_audio(path))
  return np.concatenate([s.mean(0) for s in np.array_split(logmel, segments)])


def main(argv):
  del argv
  if _DIM.value % 80:
    raise app.UsageError("--dim must be a multiple of 80 (mel bins x segments)")
  with tempfile.TemporaryDirectory() as tmp:
    suite = pathlib.Path(_TASKS_DIR.value or tmp)
    if not _TASKS_DIR.value:
      subprocess.run([sys.executable, str(_MAKE_SUITE), "--out", str(suite), "--tasks", "kws",
                      "--per_class", str(_PER_CLASS.value)], check=True, capture_output=True)
    task = tasks.read_hear_task(suite / "kws-v1")
    segments = _DIM.value // 80
    x = {name: np.stack([logmel_segment_means(p, segments) for p in s.paths])
         for name, s in task.splits.items()}
  y = {name: np.eye(len(task.vocabulary), dtype=np.float32)[
      [task.vocabulary.index(row[0]) for row in s.labels]] for name, s in task.splits.items()}
  data = probe.SplitData(x["train"], y["train"], x["valid"], y["valid"], x["test"], y["test"])
  config = probe.ProbeConfig()
  seeds = list(range(_SEEDS.value))
  timings = []
  for _ in range(2):
    start = time.perf_counter()
    runs = probe.train_probes(data, metric="top1_acc", multilabel=False, seeds=seeds,
                              config=config)
    timings.append(time.perf_counter() - start)
  choice = runs.valid_score.argmax(0)
  mean, ci = scores.confidence_interval(100 * runs.test_score[choice, np.arange(len(seeds))])
  result = {
      "device": str(jax.devices()[0]),
      "task": "kws-v1",
      "train/valid/test": [len(x["train"]), len(x["valid"]), len(x["test"])],
      "dim": _DIM.value,
      "probes": int(runs.test_score.size),
      "epochs_mean": float(runs.epochs.mean()),
      "epochs_max": int(runs.epochs.max()),
      "first_call_s": timings[0],
      "second_call_s": timings[1],
      "test_top1_acc": [mean, ci],
  }
  print("| task | train/valid/test | dim | probes | epochs (mean/max) | first call (s) | "
        "second call (s) | test acc (%) |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| kws-v1 | {'/'.join(map(str, result['train/valid/test']))} | {_DIM.value} | "
        f"{result['probes']} | {result['epochs_mean']:.0f}/{result['epochs_max']} | "
        f"{timings[0]:.1f} | {timings[1]:.1f} | {mean:.1f} ± {ci:.1f} |")
  print(f"device: {result['device']}")
  if _OUTPUT_JSON.value:
    pathlib.Path(_OUTPUT_JSON.value).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
