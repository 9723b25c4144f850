r"""Does fine-tuning pay? Fine-tuned vs frozen encoder vs random init, at equal steps.

Built-in demonstration (generates pitch-v1 and pretrains configs/demo.py, no downloads):

    python benchmarks/finetune.py --workdir=workdirs/finetune --steps=150 [--task=kws]

On the study's tasks and pretrained AudioMAE++ (`benchmarks/study.py --workdir=STUDY`), with
the small-task recipe, each run cut to at most 450 steps (about 15 minutes on a 2-core CPU), and
the HEAR probe row from the study's scores:

    python benchmarks/finetune.py --workdir=workdirs/finetune_study \
        --finetune_config=configs/finetune_small.py:study --pretrained=STUDY/audiomae \
        --tasks_dir=STUDY/tasks --tasks=kws-v1,drums-v1,env_sounds-v1 --max_steps=450 \
        --probe_scores=STUDY/scores/audiomae

1. Generates the task with ../shared/evalsuite/make_suite.py (seed 0; instruments or voices
   disjoint across splits) and pretrains configs/demo.py on the built-in synthetic corpus, or
   reads --tasks_dir and --pretrained (a pretraining workdir of the config's model).
2. For each task and seed, three runs of --config with the same steps, batch, schedule and
   augmentation: 'fine-tuned' (the pretrained encoder, all of it trained), 'frozen encoder +
   head' (the same encoder frozen: only the head learns, drop-path off) and 'random init' (the
   same classifier, no init_from). --steps sets every run's steps; --max_steps cuts a longer
   recipe, its epochs and warm-up epochs scaled alike.
3. Writes the test score (top-1 %, or mAP % for multi-label tasks) of each run's
   best-validation checkpoint as mean ± 95% CI over seeds (with the HEAR protocol's seeds of
   --probe_scores as a fourth row) to WORKDIR/results.md and results.json, every run's wall
   time and load average, and the validation curves to WORKDIR/validation.png.
Runs that finished are reused when the script is started again.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import ml_collections

import common
from audiomaepp import experiment
from audiomaepp import metrics
from audiomaepp import train
from audiomaepp.data import labelled
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.train import finetune
from audiomaepp.train import optim

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MAKE_SUITE = _REPO.parent / "shared" / "evalsuite" / "make_suite.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the task, the runs and results go.",
                               required=True)
_FINETUNE_CONFIG = flags.DEFINE_string("finetune_config", "configs/finetune_demo.py",
                              "The fine-tuning config, PATH or PATH:ARG.")
_TASK = flags.DEFINE_enum("task", "pitch", ["pitch", "kws"],
                          "Task of make_suite.py, generated when --tasks_dir is not set.")
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "Clips per class of the generated task.")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "A folder of HEAR task folders.")
_TASKS = flags.DEFINE_list("tasks", [], "Task folders of --tasks_dir.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per row.")
_ROWS = flags.DEFINE_list("rows", None, "The rows to run (default: all); finished runs of the "
                          "others are still reported.")
_STEPS = flags.DEFINE_integer("steps", None, "Fine-tuning steps of every run (default: the "
                              "config's).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Cuts a longer recipe to this many steps.")
flags.mark_flags_as_mutual_exclusive(["steps", "max_steps"])
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 400, "Steps of configs/demo.py.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "An existing pretraining workdir.")
_PROBE_SCORES = flags.DEFINE_string(
    "probe_scores", None, "A folder of the HEAR protocol's scores of the same pretrained encoder "
    "(benchmarks/study.py's STUDY/scores/ROW: TASK-Nseeds-ORDER.json).")

ROWS = {
    "fine-tuned": {"pretrained": True, "freeze_encoder": False},
    "frozen encoder + head": {"pretrained": True, "freeze_encoder": True},
    "random init": {"pretrained": False, "freeze_encoder": False},
}
PROBE_ROW = "frozen encoder + HEAR probe"


def load_config() -> ml_collections.ConfigDict:
  """--finetune_config, loaded."""
  path, _, arg = _FINETUNE_CONFIG.value.partition(":")
  return experiment.load_config(_REPO / path if not os.path.isabs(path) else path, arg or None)


def cut_to(config, num_train: int, max_steps: int) -> None:
  """Cuts `config`'s recipe to at most `max_steps` steps, its warm-up scaled by the same factor,
  so the schedule keeps its shape."""
  total = optim.total_train_steps(config, num_train)
  if total > max_steps:
    config.num_train_steps = max_steps
    with config.ignore_type():  # an int field in the recipes; a fraction of an epoch here
      config.warmup_epochs = config.warmup_epochs * max_steps / total


def finetune_config(task_dir: pathlib.Path, pretrained: pathlib.Path, row: dict, seed: int):
  """The fine-tuning config for one task, row and seed."""
  config = load_config()
  config.data.task_dir = str(task_dir)
  config.seed = seed
  if _STEPS.value:
    config.num_train_steps = _STEPS.value
    config.eval_every_steps = config.checkpoint_every_steps = max(1, _STEPS.value // 5)
  elif _MAX_STEPS.value:
    task = tasks_lib.read_hear_task(task_dir)
    num_train = sum(len(task.splits[s].files)
                    for s in labelled.split_names(config.data.train_split))
    cut_to(config, num_train, _MAX_STEPS.value)
  config.init_from = str(pretrained) if row["pretrained"] else None
  if row["freeze_encoder"]:
    config.finetune.freeze_encoder = True
    config.finetune.drop_path = 0.0
  return config


def test_score(workdir: pathlib.Path) -> float:
  """The test score (%) of the run's best-validation checkpoint (its summary)."""
  summary = json.loads((workdir / finetune.SUMMARY_FILE).read_text())
  return 100 * float(summary["test_score"])


def validation_curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, validation score %) of a run."""
  return [(r["step"], 100 * float(r.get("mAP", r.get("top1_acc"))))
          for r in metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
          if r["split"] == "eval"]


def probe_scores(folder: pathlib.Path, task: str) -> list[float]:
  """The HEAR protocol's per-seed test scores of `task` cached in `folder` (most seeds)."""
  cached = [json.loads(p.read_text())["seed_scores"] for p in folder.glob(f"{task}-*seeds-*.json")]
  return max(cached, key=len, default=[])


def cell(values: list) -> str:
  """A table cell: mean ± 95% CI over seeds ('n/a' for none, the value and '1 seed' for one)."""
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.1f} (1 seed)"
  mean, half = scores.confidence_interval(values)
  return f"{mean:.1f} ± {half:.1f} ({len(values)} seeds)"


def plot_validation(curves: dict, path: pathlib.Path) -> None:
  """One panel per task: each row's validation curves (one line per seed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
  for ax, (task, rows) in zip(axes[0], curves.items()):
    for color, (name, runs) in zip(("C0", "C1", "C2"), rows.items()):
      for i, curve in enumerate(runs):
        if curve:
          ax.plot(*zip(*curve), color=color, alpha=0.7, label=name if i == 0 else None)
    ax.set(title=task, xlabel="step", ylabel="validation score %")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  env = common.environment()
  unknown = sorted(set(_ROWS.value or ()) - set(ROWS))
  if unknown:
    raise app.UsageError(f"--rows: {unknown[0]!r} is not one of {', '.join(ROWS)}")
  times = {}
  if _TASKS_DIR.value:
    tasks_dir, names = pathlib.Path(_TASKS_DIR.value), list(_TASKS.value)
  else:
    tasks_dir, names = workdir / "tasks", [f"{_TASK.value}-v1"]
    if not (tasks_dir / names[0] / "task_metadata.json").exists():
      subprocess.run([sys.executable, str(_MAKE_SUITE), "--out", str(tasks_dir), "--tasks",
                      _TASK.value, "--per_class", str(_PER_CLASS.value), "--seed", "0"],
                     check=True)

  pretrained = pathlib.Path(_PRETRAINED.value) if _PRETRAINED.value else workdir / "pretrain"
  if not _PRETRAINED.value:
    start = time.perf_counter()
    config = experiment.load_config(_REPO / "configs" / "demo.py")
    config.num_train_steps = _PRETRAIN_STEPS.value
    config.data.data_dir = str(workdir / "corpus")
    train.run(config, str(pretrained))  # resumes, or returns at once when finished
    times["pretrain"] = time.perf_counter() - start

  runs_file = workdir / "runs.json"  # wall time and load of every run, kept across restarts
  runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
  results, curves = {}, {}
  for task in names:
    results[task], curves[task] = {}, {}
    for name, row in ROWS.items():
      results[task][name], curves[task][name] = [], []
      for seed in range(_SEEDS.value):
        run_dir = workdir / "runs" / task / f"{common.slug(name)}-seed{seed}"
        if not (run_dir / finetune.SUMMARY_FILE).exists():
          if _ROWS.value and name not in _ROWS.value:
            continue
          load = os.getloadavg()[0]
          start = time.perf_counter()
          finetune.run(finetune_config(tasks_dir / task, pretrained, row, seed), str(run_dir))
          runs[str(run_dir.relative_to(workdir))] = {
              "seconds": round(time.perf_counter() - start, 1),
              "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2)}
          common.write_json(str(runs_file), runs)
        results[task][name].append(test_score(run_dir))
        curves[task][name].append(validation_curve(run_dir))
    if _PROBE_SCORES.value:
      results[task][PROBE_ROW] = probe_scores(pathlib.Path(_PROBE_SCORES.value), task)

  columns = [*ROWS, PROBE_ROW] if _PROBE_SCORES.value else list(ROWS)
  lines = [f"{common.describe(env)}; --finetune_config {_FINETUNE_CONFIG.value}; test score % "
           "of each run's best-validation checkpoint (top-1, mAP for multi-label tasks), mean ± "
           "95% CI over seeds", "",
           "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for task, rows in results.items():
    lines.append(f"| {task} | " + " | ".join(cell(rows.get(c, [])) for c in columns) + " |")
  lines += ["", "| run | wall time (min) | load average at start / end |", "|---|---|---|"]
  lines += [f"| {name} | {r['seconds'] / 60:.1f} | {r['load_start']:.1f} / {r['load_end']:.1f} |"
            for name, r in sorted(runs.items())]
  print("\n".join(lines))
  (workdir / "results.md").write_text("\n".join(lines) + "\n")
  plot_validation(curves, workdir / "validation.png")
  common.write_json(str(workdir / "results.json"),
                    {"env": env, "config": _FINETUNE_CONFIG.value, "tasks": names,
                     "seeds": _SEEDS.value, "results": results, "curves": curves, "runs": runs,
                     "seconds": times,
                     "command": " ".join(["python", "benchmarks/finetune.py", *sys.argv[1:]])})


if __name__ == "__main__":
  app.run(main)
