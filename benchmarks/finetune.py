r"""Does fine-tuning pay? Fine-tuned vs frozen encoder vs random init, at equal steps.

    python benchmarks/finetune.py --workdir=workdirs/finetune [--task=pitch] [--seeds=3]

1. Generates the task with ../shared/evalsuite/make_suite.py (seed 0; instruments or voices
   disjoint across splits) and pretrains configs/demo.py on the built-in synthetic corpus (or
   reads --pretrained, any pretraining workdir with the demo model).
2. For each seed, three runs of configs/finetune_demo.py with the same steps, batch, schedule and
   augmentation: 'fine-tuned' (the pretrained encoder, all of it trained), 'frozen' (the same
   encoder frozen: only the head learns, drop-path off) and 'random init' (the same classifier,
   no init_from).
3. Prints the test score (top-1 %, or mAP % for multi-label tasks) of each run's best-validation
   checkpoint, as mean ± 95% CI over seeds, and writes WORKDIR/results.json.
Runs that finished are reused when the script is started again.
"""
import json
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

import common
from audiomaepp import experiment
from audiomaepp import metrics
from audiomaepp import train
from audiomaepp.evaluation import scores
from audiomaepp.train import finetune

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MAKE_SUITE = _REPO.parent / "shared" / "evalsuite" / "make_suite.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the task, the runs and results go.",
                               required=True)
_TASK = flags.DEFINE_enum("task", "pitch", ["pitch", "kws"], "Task of make_suite.py.")
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "Clips per class of the task.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per row.")
_STEPS = flags.DEFINE_integer("steps", 150, "Fine-tuning steps of every run.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 400, "Steps of configs/demo.py.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "An existing pretraining workdir.")

ROWS = {
    "fine-tuned": {"pretrained": True, "freeze_encoder": False},
    "frozen encoder + head": {"pretrained": True, "freeze_encoder": True},
    "random init": {"pretrained": False, "freeze_encoder": False},
}


def finetune_config(task_dir: pathlib.Path, pretrained: pathlib.Path, row: dict, seed: int):
  """configs/finetune_demo.py for one row and seed."""
  config = experiment.load_config(_REPO / "configs" / "finetune_demo.py")
  config.data.task_dir = str(task_dir)
  config.seed = seed
  config.num_train_steps = _STEPS.value
  config.eval_every_steps = config.checkpoint_every_steps = max(1, _STEPS.value // 5)
  config.init_from = str(pretrained) if row["pretrained"] else None
  if row["freeze_encoder"]:
    config.finetune.freeze_encoder = True
    config.finetune.drop_path = 0.0
  return config


def test_score(workdir: pathlib.Path) -> float:
  """The test score (%) the run logged for its best-validation checkpoint."""
  records = [r for r in metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
             if r["split"] == "test"]
  record = records[-1]
  return 100 * float(record.get("mAP", record.get("top1_acc")))


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name)


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  env = common.environment()
  times = {}
  task_dir = workdir / "tasks" / f"{_TASK.value}-v1"
  start = time.perf_counter()
  if not (task_dir / "task_metadata.json").exists():
    subprocess.run([sys.executable, str(_MAKE_SUITE), "--out", str(task_dir.parent), "--tasks",
                    _TASK.value, "--per_class", str(_PER_CLASS.value), "--seed", "0"], check=True)
  times["task"] = time.perf_counter() - start

  pretrained = pathlib.Path(_PRETRAINED.value) if _PRETRAINED.value else workdir / "pretrain"
  start = time.perf_counter()
  if not _PRETRAINED.value:
    config = experiment.load_config(_REPO / "configs" / "demo.py")
    config.num_train_steps = _PRETRAIN_STEPS.value
    config.data.data_dir = str(workdir / "corpus")
    train.run(config, str(pretrained))  # resumes, or returns at once when finished
  times["pretrain"] = time.perf_counter() - start

  results = {}
  for name, row in ROWS.items():
    results[name] = []
    start = time.perf_counter()
    for seed in range(_SEEDS.value):
      run_dir = workdir / "runs" / f"{_slug(name)}-seed{seed}"
      if not any(r["split"] == "test" for r in metrics.read_jsonl(
          str(run_dir / metrics.METRICS_FILE))):
        finetune.run(finetune_config(task_dir, pretrained, row, seed), str(run_dir))
      results[name].append(test_score(run_dir))
    times[name] = time.perf_counter() - start

  metadata = json.loads((task_dir / "task_metadata.json").read_text())
  metric = "mAP" if metadata["prediction_type"] == "multilabel" else "top-1"
  print(f"\n{common.describe(env)}; task {task_dir.name} ({_PER_CLASS.value} clips per class), "
        f"{_STEPS.value} steps of batch 16 per run, {_SEEDS.value} seeds")
  print(f"| row | test {metric} % (mean ± 95% CI) | per seed |")
  print("|---|---|---|")
  for name, values in results.items():
    mean, half = scores.confidence_interval(values)
    print(f"| {name} | {mean:.1f} ± {half:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
  print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  common.write_json(str(workdir / "results.json"),
                    {"env": env, "task": task_dir.name, "per_class": _PER_CLASS.value,
                     "steps": _STEPS.value, "seeds": _SEEDS.value, "metric": metric,
                     "results": results, "seconds": times,
                     "command": " ".join(["python", "benchmarks/finetune.py", *sys.argv[1:]])})


if __name__ == "__main__":
  app.run(main)
