r"""Does pretraining pay? A miniature of the paper's comparison, end to end on one machine.

    python benchmarks/study.py --workdir=workdirs/study [--corpus=real] [--scale=1] \
        [--output=docs/results.md]

1. Generates the kws and pitch tasks of ../shared/evalsuite/make_suite.py (seed 0) and the drums
   task on real drum-kit recordings (`audiomaepp.evaluation.drums`), and builds the pretraining
   corpus: `real` (default), the built-in corpus of real recordings (speech prompts, music and
   sound effects from Debian packages; `audiomaepp.data.real`), or `rich` (espeak-ng speech,
   FluidSynth music, synthetic sounds; `audiomaepp.data.rich`). Neither shares a recording,
   word, melody or random stream with the tasks.
2. Pretrains `configs/study.py` (micro AudioMAE++) and `configs/study.py:vit` (micro vanilla MAE)
   at equal budget: same widths, depths, data, steps and batch (workdirs WORKDIR/audiomaepp and
   WORKDIR/mae, as `main.py` would write them).
3. Embeds the tasks with each, with the AudioMAE++ encoder at its random initialisation (the
   parameters its pretraining started from) and with the log-mel baseline (per-clip mean and
   standard deviation over time of the 80 log-mel bins: 160 values).
4. Evaluates every row with the HEAR protocol of `audiomaepp.tools.evaluate` (10 seeds) and
   writes OUTPUT (default WORKDIR/results.md): the table (mean ± 95% CI, normalised score over the rows),
   the goals, the loss curves and a plot (PNGs beside it).

Every stage is resumable: a rerun reuses the built corpus and tasks, finished pretraining,
complete embeddings and evaluated tasks. `--scale=k` multiplies the corpus size, the training
steps and the checkpoint and eval intervals by k. `--order` is the probe's training order
(default `heareval`, the paper's protocol). Text after the notes marker in OUTPUT is kept when it
is rewritten.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import optax

import common
from audiomaepp import experiment
from audiomaepp import hear_api
from audiomaepp import metrics
from audiomaepp import models
from audiomaepp import train
from audiomaepp.data import pipeline
from audiomaepp.evaluation import drums
from audiomaepp.evaluation import embedding
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import probe
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.train import step as step_lib

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MAKE_SUITE = _REPO.parent / "shared" / "evalsuite" / "make_suite.py"
_CONFIG = _REPO / "configs" / "study.py"
NOTES_MARKER = "<!-- notes: everything below is kept when benchmarks/study.py rewrites this file -->"

_WORKDIR = flags.DEFINE_string("workdir", None, "Where tasks, models, embeddings and scores go.",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The report (default WORKDIR/results.md); its PNGs "
                              "are written beside it.")
_CORPUS = flags.DEFINE_enum("corpus", "real", ["real", "rich"], "The pretraining corpus.")
_SCALE = flags.DEFINE_integer("scale", 1, "Multiplies the corpus size and the training steps.")
_TASKS = flags.DEFINE_list("eval_tasks", ["kws", "pitch", drums.NAME],
                           f"Tasks to evaluate: make_suite.py's and {drums.NAME!r}.")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Clips per class of each task.")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Probe seeds per grid point.")
_ORDER = flags.DEFINE_enum(
    "order", "heareval", heareval.ORDERS, "Probe training order, as `tools.evaluate --order`: "
    "'heareval' (the kit's fixed permutation; the paper's protocol), 'shuffle' or 'sorted'.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 500, "Probe epoch limit (lower: smoke runs only).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's, x scale).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", None, "Corpus size (default: the config's, x scale).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the corpus is built (default: cache).")
_TREND_STEPS = flags.DEFINE_list(
    "trend_steps", [], "Also probe both pretrained models at these checkpoint steps (the trend "
    "adds the final step itself): does the score still rise with the steps? With the default "
    "steps, configs/study.py keeps 4 checkpoints, one every 250 x --scale steps: 250, 500, 750, "
    "1000 at --scale=1; 500, 1000, 1500, 2000 at --scale=2.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Run nothing: write the report from what is done (the rest: 'pending').")
_TREND_SEEDS = flags.DEFINE_integer(
    "trend_seeds", 3, "Probe seeds of the trend rows (0: representation checks only).")

# Row name -> (config argument, pretrained?); the log-mel baseline is the last row.
MODELS = {
    "AudioMAE++": ("plusplus", True),
    "MAE": ("vit", True),
    "AudioMAE++ (random init)": ("plusplus", False),
}
LOGMEL = "log-mel mean+std"
CORPORA = {
    "real": "the built-in corpus of real recordings (`config.data.source='real'`, "
            "`audiomaepp/data/real.py`): 10-s clips of speech prompts in four languages, music "
            "and sound effects from Debian packages (data card in docs/data.md).",
    "rich": "the rich built-in corpus (`config.data.source='rich'`, `audiomaepp/data/rich.py`): "
            "clips of 2-6 s of espeak-ng speech, FluidSynth music, synthetic sounds and mixtures.",
}
ROWS = (*MODELS, LOGMEL)


def study_config(block: str) -> ml_collections.ConfigDict:
  """configs/study.py for `block`, with the command line's corpus size and steps."""
  config = experiment.load_config(_CONFIG, block)
  config.data.source = _CORPUS.value
  config.data.synthetic_num_clips = _NUM_CLIPS.value or config.data.synthetic_num_clips * _SCALE.value
  config.data.data_dir = _DATA_DIR.value
  config.num_train_steps = _STEPS.value or config.num_train_steps * _SCALE.value
  # The kept checkpoints stay spread over the run (the trend probes them).
  config.checkpoint_every_steps *= _SCALE.value
  config.eval_every_steps *= _SCALE.value
  return config


def random_init_model(config: ml_collections.ConfigDict) -> hear_api.Model:
  """The encoder with the parameters `train.run` starts from (same seed, same split of keys)."""
  module = models.build_model(config.model)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  state = step_lib.create_train_state(module, optax.identity(), init_rng,
                                      tuple(module.config.input_shape))
  return hear_api.from_variables(config.model, {"params": state.params})


class Stages:
  """Wall time of each stage, kept in WORKDIR/stages.json across resumed runs."""

  def __init__(self, path: pathlib.Path, dry: bool = False):
    self.path = path
    self.dry = dry  # run nothing
    self.times = json.loads(path.read_text()) if path.exists() else {}

  def run(self, name: str, fn, done: bool = False):
    if done or self.dry:
      return None
    start = time.perf_counter()
    result = fn()
    self.times[name] = round(time.perf_counter() - start, 1)
    self.path.write_text(json.dumps(self.times, indent=1))
    print(f"[study] {name}: {self.times[name]:.0f} s", flush=True)
    return result


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  stages = Stages(workdir / "stages.json", dry=_REPORT_ONLY.value)
  env = common.environment()

  tasks_dir = workdir / "tasks"
  task_names = [f"{t}-v1" for t in _TASKS.value]
  stages.run("tasks", lambda: make_tasks(tasks_dir),
             done=all((tasks_dir / t / "task_metadata.json").exists() for t in task_names))

  configs = {row: study_config(block) for row, (block, _) in MODELS.items()}
  data = configs["AudioMAE++"].data
  stages.run("corpus", lambda: pipeline.ensure_dataset(data), done=os.path.isdir(
      pipeline.BUILT_IN[data.source].dataset_dir(data.data_dir, data.synthetic_num_clips)))
  for row, (block, pretrained) in MODELS.items():
    if pretrained:
      run_dir = workdir / ("audiomaepp" if block == "plusplus" else "mae")
      stages.run(f"pretrain {row}", lambda c=configs[row], d=run_dir: train.run(c, str(d)),
                 done=_finished(run_dir, configs[row].num_train_steps))

  run_dirs = {"AudioMAE++": workdir / "audiomaepp", "MAE": workdir / "mae"}
  models_to_embed = {row: (lambda r=row: hear_api.load_model(str(run_dirs[r])))
                     if pretrained else (lambda r=row: random_init_model(configs[r]))
                     for row, (_, pretrained) in MODELS.items()}
  for step in _TREND_STEPS.value:
    for row, run_dir in run_dirs.items():
      models_to_embed[f"{row} @ step {step}"] = (
          lambda d=run_dir, s=int(step): hear_api.load_model(str(d), step=s))
  for row, load in models_to_embed.items():
    out = workdir / "embeddings" / _slug(row)
    stages.run(f"embed {row}", lambda l=load, o=out: [
        embedding.embed_task(str(tasks_dir / t), embedding.model_embedder(l()), str(o))
        for t in task_names],
               done=all(tasks_lib.has_task_embeddings(out, t) for t in task_names))
  out = workdir / "embeddings" / _slug(LOGMEL)
  baseline = embedding.baseline_embedder("logmel_stats")
  stages.run(f"embed {LOGMEL}",
             lambda: [embedding.embed_task(str(tasks_dir / t), baseline, str(out))
                      for t in task_names],
             done=all(tasks_lib.has_task_embeddings(out, t) for t in task_names))

  config = probe.ProbeConfig(max_epochs=_MAX_EPOCHS.value, shuffle=_ORDER.value == "shuffle")
  evaluate = lambda row, seeds: {t: _evaluate(workdir, row, t, seeds, config, stages)
                                 for t in task_names}
  results = {row: evaluate(row, list(range(_SEEDS.value))) for row in ROWS}
  trend = {row: evaluate(row, list(range(_TREND_SEEDS.value)))
           for row in models_to_embed if "@ step" in row and _TREND_SEEDS.value}
  if trend:  # the final checkpoints, with the trend's seeds
    trend.update({f"{row} @ step {configs[row].num_train_steps}":
                  evaluate(row, list(range(_TREND_SEEDS.value))) for row in run_dirs})

  checks = {row: {t: _cached(workdir / "checks" / _slug(row) / f"{t}.json",
                             lambda r=row, t=t: representation_checks(
                                 workdir / "embeddings" / _slug(r) / t))
                  for t in task_names}
            for row in (*ROWS, *(r for r in models_to_embed if r not in ROWS))
            if all(tasks_lib.has_task_embeddings(workdir / "embeddings" / _slug(row), t)
                   for t in task_names)}
  output = pathlib.Path(_OUTPUT.value or workdir / "results.md")
  curves = {row: metrics.read_jsonl(str(d / metrics.METRICS_FILE)) for row, d in run_dirs.items()}
  plot_loss_curves(curves, output.with_name(output.stem + "_loss.png"))
  plot_scores(results, task_names, output.with_name(output.stem + "_scores.png"))
  setup = {"config": configs["AudioMAE++"], "per_class": _PER_CLASS.value, "seeds": _SEEDS.value,
           "order": _ORDER.value,
           "trend_seeds": _TREND_SEEDS.value,
           "params": {row: models.parameter_counts(configs[row].model) for row in run_dirs},
           # The command that makes this report (--report_only only changes what is run).
           "command": " ".join(["python", "benchmarks/study.py",
                                *(a for a in sys.argv[1:] if a != "--report_only")])}
  write_report(output, results, trend, checks, task_names, curves, setup, stages.times, env)
  print(f"[study] wrote {output}")


def make_tasks(tasks_dir: pathlib.Path) -> None:
  """Writes the evaluated tasks: make_suite.py's (seed 0) and the drums task."""
  suite = [t for t in _TASKS.value if t != drums.NAME]
  if suite:
    subprocess.run([sys.executable, str(_MAKE_SUITE), "--out", str(tasks_dir), "--tasks",
                    ",".join(suite), "--per_class", str(_PER_CLASS.value), "--seed", "0"],
                   check=True)
  if drums.NAME in _TASKS.value:
    drums.write_task(str(tasks_dir), seed=0)


def representation_checks(task_dir: pathlib.Path) -> dict:
  """Cheap second opinions on one row's embeddings of one task (seconds, not the protocol).

  `linear`: test accuracy (%) of a multinomial logistic regression on train-standardised
  embeddings (train + valid to fit), which sees past the scale of the features; `rank`: the
  effective rank (exp of the entropy of the normalised singular values) of the centred train
  embeddings, low when the features collapse onto a few directions.
  """
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel
  from sklearn import preprocessing  # pylint: disable=import-outside-toplevel
  task = tasks_lib.read_task_embeddings(task_dir)
  fit = ["train", "valid"]
  x_fit, y_fit = task.embeddings(fit), task.targets(fit).argmax(1)
  x_test, y_test = task.embeddings(["test"]), task.targets(["test"]).argmax(1)
  scaler = preprocessing.StandardScaler().fit(x_fit)
  classifier = linear_model.LogisticRegression(max_iter=3000).fit(scaler.transform(x_fit), y_fit)
  train = task.embeddings(["train"])
  singular = np.linalg.svd(train - train.mean(0), compute_uv=False)
  p = singular / singular.sum()
  return {"linear": 100 * float((classifier.predict(scaler.transform(x_test)) == y_test).mean()),
          "rank": float(np.exp(-(p * np.log(p + 1e-12)).sum())), "dim": int(train.shape[1])}


def _cached(path: pathlib.Path, compute) -> dict:
  """`compute()`, stored as JSON at `path` the first time."""
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compute()))
  return json.loads(path.read_text())


def _evaluate(workdir: pathlib.Path, row: str, task: str, seeds: list, config: probe.ProbeConfig,
              stages: Stages) -> dict:
  """One row's result on one task (TaskResult.to_json()), cached per row, task and seeds; None
  when it is not cached and `stages` runs nothing."""
  cache = workdir / "scores" / _slug(row) / f"{task}-{len(seeds)}seeds-{_ORDER.value}.json"
  if cache.exists():
    return json.loads(cache.read_text())
  if stages.dry:
    return None
  task_dir = workdir / "embeddings" / _slug(row) / task
  embeddings = heareval.arrange(tasks_lib.read_task_embeddings(task_dir), task_dir, _ORDER.value)
  result = stages.run(f"evaluate {row} {task} ({len(seeds)} seeds)",
                      lambda: probe.evaluate_task(embeddings, seeds, config))
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text(json.dumps(result.to_json()))
  return result.to_json()


def _model_then_step(item: tuple[str, object]) -> tuple[str, int]:
  """Sort key of a trend row 'MODEL @ step N': the model, then N as a number."""
  model, _, step = item[0].partition(" @ step ")
  return model, int(step)


def _slug(row: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_")


def _finished(run_dir: pathlib.Path, steps: int) -> bool:
  records = metrics.read_jsonl(str(run_dir / metrics.METRICS_FILE))
  return any(r.get("step") == steps and r.get("split") == "train" for r in records)


def plot_loss_curves(curves: dict, path: pathlib.Path) -> None:
  """Train (lines) and eval (markers) masked-patch MSE of the pretrained models against step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for (row, records), color in zip(curves.items(), ("tab:blue", "tab:orange")):
    for split, style in (("train", "-"), ("eval", "o--")):
      points = [(r["step"], r["loss"]) for r in records if r.get("split") == split]
      if points:
        ax.plot(*zip(*points), style, color=color, label=f"{row} {split}", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("masked-patch MSE")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_scores(results: dict, task_names: list, path: pathlib.Path) -> None:
  """Grouped bars: each row's mean test score per task with its 95% CI."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / len(results)
  for i, (row, by_task) in enumerate(results.items()):
    ax.bar(np.arange(len(task_names)) + (i - (len(results) - 1) / 2) * width,
           [by_task[t]["mean"] if by_task[t] else np.nan for t in task_names], width,
           yerr=[by_task[t]["ci"] or 0.0 if by_task[t] else 0.0 for t in task_names], capsize=3,
           label=row)
  ax.set_xticks(range(len(task_names)), task_names)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def goals(results: dict, task_names: list) -> list[tuple[str, bool, str]]:
  """The study's three goals: (statement, met? (None: pending), the numbers behind it)."""
  if any(results[row][t] is None for row in results for t in task_names):
    return [(goal, None, "not all rows are evaluated yet") for goal in (
        "pretrained > random init on every task", "AudioMAE++ >= MAE",
        "pretrained > log-mel baseline on at least one task")]
  mean = lambda row, t: results[row][t]["mean"]
  pretrained = [r for r, (_, p) in MODELS.items() if p]
  random_init = next(r for r, (_, p) in MODELS.items() if not p)
  return [
      ("pretrained > random init on every task",
       all(mean(r, t) > mean(random_init, t) for r in pretrained for t in task_names),
       "; ".join(f"{t}: " + ", ".join(f"{r} {mean(r, t):.1f}" for r in (*pretrained, random_init))
                 for t in task_names)),
      ("AudioMAE++ >= MAE",
       all(mean("AudioMAE++", t) >= mean("MAE", t) for t in task_names),
       "; ".join(f"{t}: {mean('AudioMAE++', t):.1f} vs {mean('MAE', t):.1f}" for t in task_names)),
      ("pretrained > log-mel baseline on at least one task",
       any(mean(r, t) > mean(LOGMEL, t) for r in pretrained for t in task_names),
       "; ".join(f"{t}: best pretrained {max(mean(r, t) for r in pretrained):.1f} vs "
                 f"{mean(LOGMEL, t):.1f}" for t in task_names)),
  ]


def score_table(results: dict, task_names: list, normalized: bool = True) -> list[str]:
  """Markdown rows: mean ± 95% CI per task and (optionally) the normalised score over the rows
  evaluated on every task; cells not evaluated yet read 'pending'."""
  complete = {row: {t: by_task[t]["mean"] for t in task_names}
              for row, by_task in results.items() if all(by_task[t] for t in task_names)}
  s = scores.normalized_scores(complete, task_names) if normalized else None
  lines = ["| model | " + " | ".join(task_names) + (" | s(m) |" if normalized else " |"),
           "|---|" + "---|" * (len(task_names) + normalized)]
  for row, by_task in results.items():
    cells = [f"{by_task[t]['mean']:.1f} ± {by_task[t]['ci'] or 0:.1f}" if by_task[t] else "pending"
             for t in task_names]
    score = f" | {s[row]:.1f} |" if row in (s or {}) else (" | pending |" if normalized else " |")
    lines.append(f"| {row} | " + " | ".join(cells) + score)
  return lines


def write_report(output: pathlib.Path, results: dict, trend: dict, checks: dict,
                 task_names: list, curves: dict, setup: dict, times: dict, env: dict) -> None:
  """OUTPUT: command, setup, table, goals, curves and plots; keeps the notes below the marker."""
  config, params = setup["config"], setup["params"]
  final = {row: {s: next((r["loss"] for r in reversed(recs) if r.get("split") == s), None)
                 for s in ("train", "eval")} for row, recs in curves.items()}
  m = config.model
  lines = [
      "# Does pretraining pay? (a miniature of the paper's comparison)", "",
      "Made by `benchmarks/study.py`. Command:", "", f"    {setup['command']}", "",
      f"Machine: {common.describe(env)}. Wall time: {sum(times.values()) / 60:.1f} min in all "
      "(stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").", "",
      "## Setup", "",
      f"- Corpus: {CORPORA[config.data.source]}",
      f"- Models (`configs/study.py`): width {m.width}, depth {m.depth}, {m.num_heads} heads, "
      f"decoder {m.decoder_width} x {m.decoder_depth}, 2-D rotary positions; AudioMAE++ "
      f"(transformer++ blocks, {params['AudioMAE++']['encoder'] / 1e6:.2f} M encoder parameters) "
      f"vs vanilla MAE (ViT blocks, {params['MAE']['encoder'] / 1e6:.2f} M); both "
      f"{config.num_train_steps} steps of batch {config.batch_size}, peak lr "
      f"{config.base_lr * config.batch_size / 256:g}.",
      "- Rows: both pretrained encoders; the AudioMAE++ encoder at its random initialisation "
      "(the parameters its pretraining started from); the log-mel baseline (per-clip mean and "
      "standard deviation over time of the 80 log-mel bins, 160 values).",
      f"- Tasks: {', '.join(task_names)}; kws and pitch from `make_suite.py` (a HEAR-format task generator "
      f"outside the repository, `../shared/evalsuite/`) `--per_class {setup['per_class']} --seed 0` (voices / instruments disjoint across splits), "
      "drums from real drum-kit recordings (`audiomaepp/evaluation/drums.py`, kits disjoint "
      "across splits); HEAR probe "
      f"protocol of `audiomaepp.tools.evaluate --order={setup['order']}`, {setup['seeds']} "
      "seeds; test accuracy (%), "
      "mean ± 95% CI over seeds; s(m): normalised score over these rows.", "",
      "## Results", "", *score_table(results, task_names), "",
      f"![scores]({output.stem}_scores.png)", "",
      "Final masked-patch MSE (train / eval): " + "; ".join(
          f"{row} {v['train']:.3f} / {v['eval']:.3f}" for row, v in final.items()
          if v["train"] is not None and v["eval"] is not None) + ".", "",
      f"![loss curves]({output.stem}_loss.png)", "",
      "## Goals", "",
      *[f"- {'pending' if ok is None else 'met' if ok else '**missed**'}: {goal} ({numbers})"
        for goal, ok, numbers in goals(results, task_names)], ""]
  if trend:
    lines += ["## Trend over pretraining steps", "",
              f"The pretrained models' checkpoints, {setup['trend_seeds']} probe seeds each:", "",
              *score_table(dict(sorted(trend.items(), key=_model_then_step)), task_names,
                           normalized=False), ""]
  lines += ["## Representation checks", "",
            "Not the protocol: a logistic regression on standardised embeddings (fit on train + "
            "valid; test accuracy %) and the effective rank of the train embeddings (of dim D).", "",
            "| model | " + " | ".join(f"{t} linear | {t} rank" for t in task_names) + " |",
            "|---|" + "---|---|" * len(task_names)]
  lines += [f"| {row} | " + " | ".join(f"{c[t]['linear']:.1f} | {c[t]['rank']:.1f} / {c[t]['dim']}"
                                       for t in task_names) + " |" for row, c in checks.items()]
  lines += ["", NOTES_MARKER, ""]
  notes = ""
  if output.exists() and NOTES_MARKER in output.read_text():
    notes = output.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n")
  output.write_text("\n".join(lines) + notes)


if __name__ == "__main__":
  app.run(main)
