r"""Does pretraining pay, and where does AudioMAE++ beat MAE? A miniature of the paper's
comparison, end to end on one machine.

    python benchmarks/study.py --workdir=workdirs/study [--corpus=real] [--scale=1] \
        [--output=docs/results.md]

1. Writes the tasks: kws and pitch of ../shared/evalsuite/make_suite.py (seed 0), drums on real
   drum-kit recordings (`audiomaepp.evaluation.drums`) and the tasks on real recordings of the
   families where the paper's Tiny AudioMAE++ beats MAE (`audiomaepp.evaluation.packaged_tasks`:
   environmental sounds, spoken language, speaker), and builds the pretraining corpus: `real`
   (default; `audiomaepp.data.real`) or `rich` (`audiomaepp.data.rich`). No task shares a
   recording with the corpus.
2. Pretrains four models at equal budget, as `main.py` would (workdirs WORKDIR/<row>): the
   primary pair with the paper's positions (fixed sin-cos, no RoPE), `configs/study.py`
   (AudioMAE++) and `configs/study.py:vit` (MAE), and the ablation pair with rotary 2-D patch
   positions (`:plusplus,patch_2d`, `:vit,patch_2d`). Each run probes every task while it trains
   (`config.probe`, `audiomaepp.train.probes`): the trend over clips seen.
3. Embeds the tasks with each pretrained encoder, with the AudioMAE++ encoder at its random
   initialisation and with the log-mel baseline (per-clip mean and standard deviation over time
   of the 80 log-mel bins: 160 values).
4. Evaluates every row with the HEAR protocol of `audiomaepp.tools.evaluate` (`--seeds` seeds)
   and writes OUTPUT (default WORKDIR/results.md): the table with the normalised score s(m), the
   sign of AudioMAE++ - MAE per family next to the paper's Tiny rows, the goals, the probes'
   trend, the probe's ranking against the protocol's, loss curves and plots (PNGs beside it).

Every stage is resumable: a rerun reuses the built corpus and tasks, finished pretraining,
complete embeddings and evaluated tasks. `--scale=k` multiplies the corpus size, the training
steps and the checkpoint, eval and probe intervals by k. `--order` is the probe's training order
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
from audiomaepp.audio import features
from audiomaepp.data import pipeline
from audiomaepp.evaluation import drums
from audiomaepp.evaluation import embedding
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import packaged_tasks
from audiomaepp.evaluation import probe
from audiomaepp.evaluation import scores
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.train import probes
from audiomaepp.train import step as step_lib

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MAKE_SUITE = _REPO.parent / "shared" / "evalsuite" / "make_suite.py"
_CONFIG = _REPO / "configs" / "study.py"
NOTES_MARKER = "<!-- notes: everything below is kept when benchmarks/study.py rewrites this file -->"
_SUITE_TASKS = ("kws", "pitch")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where tasks, models, embeddings and scores go.",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The report (default WORKDIR/results.md); its PNGs "
                              "are written beside it.")
_CORPUS = flags.DEFINE_enum("corpus", "real", ["real", "rich"], "The pretraining corpus.")
_SCALE = flags.DEFINE_integer("scale", 1, "Multiplies the corpus size and the training steps.")
_TASKS = flags.DEFINE_list(
    "eval_tasks", [*_SUITE_TASKS, drums.NAME, *packaged_tasks.NAMES],
    f"Tasks to evaluate: make_suite.py's {_SUITE_TASKS}, {drums.NAME!r} and those of "
    "audiomaepp.evaluation.packaged_tasks.")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Clips per class of make_suite.py's tasks.")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Probe seeds per grid point.")
_ORDER = flags.DEFINE_enum(
    "order", "heareval", heareval.ORDERS, "Probe training order, as `tools.evaluate --order`: "
    "'heareval' (the kit's fixed permutation; the paper's protocol), 'shuffle' or 'sorted'.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 500, "Probe epoch limit (lower: smoke runs only).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's, x scale).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", None, "Corpus size (default: the config's, x scale).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the corpus is built (default: cache).")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Run nothing: write the report from what is done (the rest: 'pending').")

# Row name -> (configs/study.py argument, pretrained?); the log-mel baseline is the last row.
MODELS = {
    "AudioMAE++": ("plusplus", True),
    "MAE": ("vit", True),
    "AudioMAE++ (2-D RoPE)": ("plusplus,patch_2d", True),
    "MAE (2-D RoPE)": ("vit,patch_2d", True),
    "AudioMAE++ (random init)": ("plusplus", False),
}
PRIMARY = ("AudioMAE++", "MAE")  # the paper's positions; the pair the goals compare
LOGMEL = "log-mel mean+std"
ROWS = (*MODELS, LOGMEL)
PRETRAINED = tuple(row for row, (_, pretrained) in MODELS.items() if pretrained)
RANDOM_INIT = "AudioMAE++ (random init)"
# Task -> (family, the paper's task of that family, its AudioMAE++-Tiny and MAE-Tiny scores;
# paper Table 2). Speaker identity is compared with CREMA-D, the paper's task on speakers'
# voices (emotion).
FAMILIES = {
    "kws-v1": ("keyword spotting", "SpeechCommands 5h", 74.0, 74.3),
    "pitch-v1": ("pitch", "NSynth pitch 5h", 64.0, 66.4),
    "drums-v1": ("percussion strokes", "Mridangam stroke", 96.7, 97.1),
    "env_sounds-v1": ("environmental sounds", "ESC-50", 76.6, 70.1),
    "language_id-v1": ("language identification", "VoxLingua107 top 10", 32.1, 26.4),
    "speaker_id-v1": ("speaker identity", "CREMA-D (emotion)", 65.1, 63.2),
}
PAPER_SM = (78.8, 77.6)  # s(m) of AudioMAE++-Tiny and MAE-Tiny
CORPORA = {
    "real": "the built-in corpus of real recordings (`config.data.source='real'`, "
            "`audiomaepp/data/real.py`): 10-s clips of speech prompts in four languages, music "
            "and sound effects from Debian packages (data card in docs/data.md).",
    "rich": "the rich built-in corpus (`config.data.source='rich'`, `audiomaepp/data/rich.py`): "
            "clips of 2-6 s of espeak-ng speech, FluidSynth music, synthetic sounds and mixtures.",
}


def task_names() -> list[str]:
  return [f"{t}-v1" for t in _TASKS.value]


def study_config(arg: str, tasks_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """configs/study.py:`arg` with the command line's corpus size and steps, probing the tasks."""
  config = experiment.load_config(_CONFIG, arg)
  config.data.source = _CORPUS.value
  config.data.synthetic_num_clips = _NUM_CLIPS.value or config.data.synthetic_num_clips * _SCALE.value
  config.data.data_dir = _DATA_DIR.value
  config.num_train_steps = _STEPS.value or config.num_train_steps * _SCALE.value
  config.checkpoint_every_steps *= _SCALE.value
  config.eval_every_steps *= _SCALE.value
  config.probe.every_steps *= _SCALE.value
  config.probe.tasks = ",".join(str(tasks_dir / t) for t in task_names())
  return config


def random_init_model(config: ml_collections.ConfigDict) -> hear_api.Model:
  """The encoder with the parameters `train.run` starts from (same seed, same split of keys)."""
  module = models.build_model(config.model)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  state = step_lib.create_train_state(module, optax.identity(), init_rng,
                                      tuple(module.config.input_shape))
  return hear_api.from_variables(config.model, {"params": state.params})


def initial_probe(config: ml_collections.ConfigDict, tasks_dir: pathlib.Path,
                  task_names: list) -> dict:
  """Task -> the in-training probe's score of the encoder `train.run` starts from, on the clips
  the probes of `config.probe` read (the reference the probe curves rise from)."""
  model = random_init_model(config)
  out = {}
  for t in task_names:
    data = probes.read_task(str(tasks_dir / t), model.chunk_frames, config.probe.max_clips,
                            config.probe.chunks_per_clip)
    frames = hear_api.encode_chunks(data.chunks, len(data.targets), data.pad, model)
    out[t] = probes.probe_score(np.asarray(frames.mean(1)), data.targets, data.folds)
  return out


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
  names = task_names()
  stages.run("tasks", lambda: make_tasks(tasks_dir),
             done=all((tasks_dir / t / "task_metadata.json").exists() for t in names))

  configs = {row: study_config(arg, tasks_dir) for row, (arg, _) in MODELS.items()}
  data = configs["AudioMAE++"].data
  stages.run("corpus", lambda: pipeline.ensure_dataset(data), done=os.path.isdir(
      pipeline.BUILT_IN[data.source].dataset_dir(data.data_dir, data.synthetic_num_clips)))
  run_dirs = {row: workdir / common.slug(row) for row in PRETRAINED}
  for row, run_dir in run_dirs.items():
    stages.run(f"pretrain {row}", lambda c=configs[row], d=run_dir: train.run(c, str(d)),
               done=_finished(run_dir, configs[row].num_train_steps))

  loaders = {row: (lambda r=row: hear_api.load_model(str(run_dirs[r]))) if pretrained
             else (lambda r=row: random_init_model(configs[r]))
             for row, (_, pretrained) in MODELS.items()}
  for row, load in loaders.items():
    out = workdir / "embeddings" / common.slug(row)
    stages.run(f"embed {row}", lambda l=load, o=out: [
        embedding.embed_task(str(tasks_dir / t), embedding.model_embedder(l()), str(o))
        for t in names], done=all(tasks_lib.has_task_embeddings(out, t) for t in names))
  out = workdir / "embeddings" / common.slug(LOGMEL)
  baseline = embedding.baseline_embedder("logmel_stats")
  stages.run(f"embed {LOGMEL}",
             lambda: [embedding.embed_task(str(tasks_dir / t), baseline, str(out)) for t in names],
             done=all(tasks_lib.has_task_embeddings(out, t) for t in names))

  config = probe.ProbeConfig(max_epochs=_MAX_EPOCHS.value, shuffle=_ORDER.value == "shuffle")
  results = {row: {t: _evaluate(workdir, row, t, list(range(_SEEDS.value)), config, stages)
                   for t in names} for row in ROWS}
  checks = {row: {t: _cached(workdir / "checks" / common.slug(row) / f"{t}.json",
                             lambda r=row, t=t: representation_checks(
                                 workdir / "embeddings" / common.slug(r) / t))
                  for t in names}
            for row in ROWS
            if all(tasks_lib.has_task_embeddings(workdir / "embeddings" / common.slug(row), t)
                   for t in names)}
  initial_path = workdir / "checks" / f"{common.slug(RANDOM_INIT)}-probe.json"
  stages.run(f"probe {RANDOM_INIT}", lambda: common.write_json(
      str(initial_path), initial_probe(configs[RANDOM_INIT], tasks_dir, names)),
             done=initial_path.exists())
  initial = json.loads(initial_path.read_text()) if initial_path.exists() else None
  output = pathlib.Path(_OUTPUT.value or workdir / "results.md")
  records = {row: metrics.read_jsonl(str(d / metrics.METRICS_FILE)) for row, d in run_dirs.items()}
  plot_loss_curves(records, output.with_name(output.stem + "_loss.png"))
  plot_scores(results, names, output.with_name(output.stem + "_scores.png"))
  plot_probes(records, names, configs["AudioMAE++"].batch_size,
              output.with_name(output.stem + "_probes.png"), initial)
  setup = {"config": configs["AudioMAE++"], "per_class": _PER_CLASS.value, "seeds": _SEEDS.value,
           "order": _ORDER.value,
           "params": {row: models.parameter_counts(configs[row].model) for row in PRIMARY},
           # The command that makes this report (--report_only only changes what is run).
           "command": " ".join(["python", "benchmarks/study.py",
                                *(a for a in sys.argv[1:] if a != "--report_only")])}
  write_report(output, results, records, checks, initial, names, setup, stages.times, env)
  print(f"[study] wrote {output}")


def make_tasks(tasks_dir: pathlib.Path) -> None:
  """Writes the evaluated tasks: make_suite.py's (seed 0), drums and the packaged ones."""
  suite = [t for t in _TASKS.value if t in _SUITE_TASKS]
  if suite:
    subprocess.run([sys.executable, str(_MAKE_SUITE), "--out", str(tasks_dir), "--tasks",
                    ",".join(suite), "--per_class", str(_PER_CLASS.value), "--seed", "0"],
                   check=True)
  if drums.NAME in _TASKS.value:
    drums.write_task(str(tasks_dir), seed=0)
  for name in packaged_tasks.NAMES:
    if name in _TASKS.value:
      packaged_tasks.write_task(name, str(tasks_dir), seed=0)


def representation_checks(task_dir: pathlib.Path) -> dict:
  """Cheap second opinions on one row's embeddings of one task (seconds, not the protocol).

  `linear`: the in-training probe (`probes.probe_score`: ridge classifiers on standardised
  embeddings, each split scored by a fit on the others) on every clip; `rank`: the effective rank
  (exp of the entropy of the normalised singular values) of the centred train embeddings, low
  when the features collapse onto a few directions.
  """
  task = tasks_lib.read_task_embeddings(task_dir)
  splits = probes.probe_splits(task.metadata)
  targets = task.targets(splits)
  folds = np.repeat(np.arange(len(splits)), [len(task.splits[s].labels) for s in splits])
  linear = probes.probe_score(task.embeddings(splits),
                              targets if task.multilabel else targets.argmax(1), folds)
  train = task.embeddings(["train"])
  singular = np.linalg.svd(train - train.mean(0), compute_uv=False)
  p = singular / singular.sum()
  return {"linear": linear, "rank": float(np.exp(-(p * np.log(p + 1e-12)).sum())),
          "dim": int(train.shape[1])}


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
  cache = workdir / "scores" / common.slug(row) / f"{task}-{len(seeds)}seeds-{_ORDER.value}.json"
  if cache.exists():
    return json.loads(cache.read_text())
  if stages.dry:
    return None
  task_dir = workdir / "embeddings" / common.slug(row) / task
  embeddings = heareval.arrange(tasks_lib.read_task_embeddings(task_dir), task_dir, _ORDER.value)
  result = stages.run(f"evaluate {row} {task} ({len(seeds)} seeds)",
                      lambda: probe.evaluate_task(embeddings, seeds, config))
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text(json.dumps(result.to_json()))
  return result.to_json()


def _finished(run_dir: pathlib.Path, steps: int) -> bool:
  records = metrics.read_jsonl(str(run_dir / metrics.METRICS_FILE))
  return any(r.get("step") == steps and r.get("split") == "train" for r in records)


def probe_curves(records: dict, task_names: list) -> dict:
  """Row -> {step: {task: score}} of the probes logged while pretraining (steps with every
  task)."""
  return {row: {r["step"]: {t: r[t] for t in task_names} for r in recs
                if r.get("split") == "probe" and all(r.get(t) is not None for t in task_names)}
          for row, recs in records.items()}


def trend(records: dict, task_names: list, batch_size: int) -> list[dict]:
  """Per probed step of the primary pair: clips seen, AudioMAE++ - MAE per task and in s(m)
  (normalised per task over both models' probes at every step)."""
  curves = probe_curves({row: records.get(row, []) for row in PRIMARY}, task_names)
  steps = sorted(set(curves[PRIMARY[0]]) & set(curves[PRIMARY[1]]))
  if not steps:
    return []
  points = {f"{row}@{s}": curves[row][s] for row in PRIMARY for s in steps}
  normalised = scores.normalized_scores(points, task_names)
  return [{"step": s, "clips": s * batch_size,
           "gaps": {t: curves[PRIMARY[0]][s][t] - curves[PRIMARY[1]][s][t] for t in task_names},
           "sm_gap": normalised[f"{PRIMARY[0]}@{s}"] - normalised[f"{PRIMARY[1]}@{s}"]}
          for s in steps]


def probe_overhead(records: list, stage_seconds: float | None) -> float | None:
  """Share of a pretraining run's time spent probing: probe seconds / the rest of the run."""
  spent = sum(r.get("seconds") or 0.0 for r in records if r.get("split") == "probe")
  if not stage_seconds or not spent:
    return None
  return spent / (stage_seconds - spent)


def kendall_tau(a: list, b: list) -> float:
  """Kendall's tau-b of two score lists (the rankings' agreement: 1 equal, -1 reversed)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.kendalltau(a, b).statistic)


def plot_loss_curves(records: dict, path: pathlib.Path) -> None:
  """Train (lines) and eval (markers) masked-patch MSE of the pretrained models against step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for (row, recs), color in zip(records.items(), ("tab:blue", "tab:orange", "tab:cyan",
                                                  "tab:red")):
    for split, style in (("train", "-"), ("eval", "o--")):
      points = [(r["step"], r["loss"]) for r in recs if r.get("split") == split]
      if points:
        ax.plot(*zip(*points), style, color=color, label=f"{row} {split}", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("masked-patch MSE")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_probes(records: dict, task_names: list, batch_size: int, path: pathlib.Path,
                initial: dict | None = None) -> None:
  """One panel per task: each pretrained model's probe score against clips seen (log scale),
  and the AudioMAE++ encoder's at its initialisation (`initial`, a dashed line)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  curves = probe_curves(records, task_names)
  columns = 3
  rows = -(-len(task_names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
  styles = {"AudioMAE++": ("tab:blue", "o-"), "MAE": ("tab:orange", "o-"),
            "AudioMAE++ (2-D RoPE)": ("tab:blue", "x:"), "MAE (2-D RoPE)": ("tab:orange", "x:")}
  for ax, task in zip(axes.flat, task_names):
    for row, points in curves.items():
      if points:
        steps = sorted(points)
        color, style = styles.get(row, ("gray", "o-"))
        ax.plot([s * batch_size for s in steps], [points[s][task] for s in steps], style,
                color=color, label=row, markersize=4)
    if initial:
      ax.axhline(initial[task], color="gray", linestyle="--", label=f"{PRIMARY[0]} at init")
    ax.set_xscale("log")
    ax.minorticks_off()
    clips = sorted({s * batch_size for points in curves.values() for s in points})
    ax.set_xticks(clips, [f"{c:,}" for c in clips], fontsize="small")
    ax.set_title(task)
    ax.set_xlabel("clips seen")
    ax.set_ylabel("probe score (%)")
    ax.grid(True, alpha=0.3)
  for ax in list(axes.flat)[len(task_names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_scores(results: dict, task_names: list, path: pathlib.Path) -> None:
  """Grouped bars: each row's mean test score per task with its 95% CI."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(results)
  for i, (row, by_task) in enumerate(results.items()):
    ax.bar(np.arange(len(task_names)) + (i - (len(results) - 1) / 2) * width,
           [by_task[t]["mean"] if by_task[t] else np.nan for t in task_names], width,
           yerr=[by_task[t]["ci"] or 0.0 if by_task[t] else 0.0 for t in task_names], capsize=2,
           label=row)
  ax.set_xticks(range(len(task_names)), task_names)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize="x-small", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _complete(results: dict, task_names: list) -> dict:
  """Row -> task -> mean of the rows evaluated on every task."""
  return {row: {t: by_task[t]["mean"] for t in task_names}
          for row, by_task in results.items() if all(by_task[t] for t in task_names)}


def goals(results: dict, task_names: list) -> list[tuple[str, bool, str]]:
  """The study's goals: (statement, met? (None: pending), the numbers behind it)."""
  statements = ("AudioMAE++ > MAE on environmental sounds and on language identification",
                "s(m) of AudioMAE++ >= s(m) of MAE",
                "pretrained > random init on every task but pitch")
  means = _complete(results, task_names)
  if any(row not in means for row in (*PRIMARY, RANDOM_INIT)):
    return [(goal, None, "not all rows are evaluated yet") for goal in statements]
  mean = lambda row, t: means[row][t]
  claimed = [t for t in task_names if FAMILIES.get(t, ("",))[0] in (
      "environmental sounds", "language identification")]
  s = scores.normalized_scores(means, task_names)
  not_pitch = [t for t in task_names if t != "pitch-v1"]
  return [
      (statements[0], bool(claimed) and all(mean("AudioMAE++", t) > mean("MAE", t)
                                            for t in claimed),
       "; ".join(f"{t}: {mean('AudioMAE++', t):.1f} vs {mean('MAE', t):.1f}" for t in claimed)
       or "no such task evaluated"),
      (statements[1], s["AudioMAE++"] >= s["MAE"],
       f"{s['AudioMAE++']:.1f} vs {s['MAE']:.1f}"),
      (statements[2], all(mean(r, t) > mean(RANDOM_INIT, t) for r in PRIMARY for t in not_pitch),
       "; ".join(f"{t}: " + ", ".join(f"{r} {mean(r, t):.1f}" for r in (*PRIMARY, RANDOM_INIT))
                 for t in not_pitch)),
  ]


def score_table(results: dict, task_names: list) -> list[str]:
  """Markdown rows: mean ± 95% CI per task and the normalised score s(m) over the rows evaluated
  on every task; cells not evaluated yet read 'pending'."""
  complete = _complete(results, task_names)
  s = scores.normalized_scores(complete, task_names) if complete else {}
  lines = ["| model | " + " | ".join(task_names) + " | s(m) |",
           "|---|" + "---|" * (len(task_names) + 1)]
  for row, by_task in results.items():
    cells = [f"{by_task[t]['mean']:.1f} ± {by_task[t]['ci'] or 0:.1f}" if by_task[t] else "pending"
             for t in task_names]
    lines.append(f"| {row} | " + " | ".join(cells) +
                 (f" | {s[row]:.1f} |" if row in s else " | pending |"))
  return lines


def paper_table(results: dict, task_names: list) -> list[str]:
  """Markdown rows: per family, AudioMAE++ - MAE here and in the paper's Tiny rows, and whether
  the signs agree; the last row compares s(m)."""
  means = _complete(results, task_names)
  lines = ["| family | task here | AudioMAE++ - MAE here | paper's task | AudioMAE++ - MAE, "
           "paper Tiny | same sign |", "|---|---|---|---|---|---|"]
  sign = lambda x: "+" if x > 0 else "-" if x < 0 else "0"
  for t in task_names:
    if t not in FAMILIES:
      continue
    family, paper_task, ours_paper, mae_paper = FAMILIES[t]
    paper_gap = ours_paper - mae_paper
    if all(row in means for row in PRIMARY):
      gap = means["AudioMAE++"][t] - means["MAE"][t]
      here, same = f"{gap:+.1f} ({sign(gap)})", "yes" if sign(gap) == sign(paper_gap) else "no"
    else:
      here, same = "pending", "pending"
    lines.append(f"| {family} | {t} | {here} | {paper_task} | {paper_gap:+.1f} "
                 f"({ours_paper} vs {mae_paper}) | {same} |")
  paper_gap = PAPER_SM[0] - PAPER_SM[1]
  if means and all(row in means for row in PRIMARY):
    s = scores.normalized_scores(means, task_names)
    gap = s["AudioMAE++"] - s["MAE"]
    here, same = f"{gap:+.1f} ({sign(gap)})", "yes" if sign(gap) == sign(paper_gap) else "no"
  else:
    here, same = "pending", "pending"
  lines.append(f"| **s(m)** | all rows here | {here} | all the paper's rows | {paper_gap:+.1f} "
               f"({PAPER_SM[0]} vs {PAPER_SM[1]}) | {same} |")
  return lines


def init_gaps(records: dict, initial: dict, task_names: list, batch_size: int) -> list[dict]:
  """Per probed step of AudioMAE++: clips seen and its probe minus its initial encoder's, per
  task."""
  curve = probe_curves({PRIMARY[0]: records.get(PRIMARY[0], [])}, task_names)[PRIMARY[0]]
  return [{"step": s, "clips": s * batch_size,
           "gaps": {t: curve[s][t] - initial[t] for t in task_names}} for s in sorted(curve)]


def init_table(points: list, initial: dict, task_names: list) -> list[str]:
  """Markdown rows: the initial encoder's probe scores, then AudioMAE++'s gap to them at each
  probed budget."""
  lines = ["| step | clips seen | " + " | ".join(task_names) + " |",
           "|---|---|" + "---|" * len(task_names),
           "| 0 (its score) | 0 | " + " | ".join(f"{initial[t]:.1f}" for t in task_names) + " |"]
  lines += [f"| {p['step']} | {p['clips']:,} | " +
            " | ".join(f"{p['gaps'][t]:+.1f}" for t in task_names) + " |" for p in points]
  return lines


def trend_table(points: list, task_names: list) -> list[str]:
  """Markdown rows: the probes' AudioMAE++ - MAE per task and in s(m) at each probed budget."""
  lines = ["| step | clips seen | " + " | ".join(task_names) + " | s(m) |",
           "|---|---|" + "---|" * (len(task_names) + 1)]
  for p in points:
    lines.append(f"| {p['step']} | {p['clips']:,} | " +
                 " | ".join(f"{p['gaps'][t]:+.1f}" for t in task_names) + f" | {p['sm_gap']:+.1f} |")
  return lines


def separated_pairs(results: dict, rows: list, task: str) -> list[tuple[str, str]]:
  """Pairs of rows the HEAR protocol separates on `task`: their means differ by more than the
  sum of their 95% CI half-widths."""
  r = {row: results[row][task] for row in rows}
  return [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]
          if abs(r[a]["mean"] - r[b]["mean"]) > r[a]["ci"] + r[b]["ci"]]


def concordant(pairs: list, protocol: dict, other: dict) -> int:
  """How many of `pairs` `other` orders as `protocol` does."""
  return sum((protocol[a] - protocol[b]) * (other[a] - other[b]) > 0 for a, b in pairs)


def self_agreement(results: dict, rows: list, task: str) -> float:
  """The protocol's agreement with itself: Kendall's tau between one seed's ranking of the rows
  and the mean of the other seeds', averaged over the seeds."""
  seeds = np.asarray([results[row][task]["seed_scores"] for row in rows])
  return float(np.mean([kendall_tau(seeds[:, i], np.delete(seeds, i, 1).mean(1))
                        for i in range(seeds.shape[1])]))


def ranking_table(results: dict, checks: dict, records: dict, task_names: list) -> list[str]:
  """Markdown rows: per task, the HEAR protocol's agreement with itself, and Kendall's tau and
  the concordant pairs of those the protocol separates between its ranking and the in-training
  probe's on every clip (all rows), and the last in-training probe's (pretrained rows)."""
  means = _complete(results, task_names)
  last = {row: max(c.items())[1] for row, c in probe_curves(records, task_names).items() if c}
  lines = ["| task | protocol: one seed vs the others | probe, every clip, all rows: "
           "tau; pairs ordered as the protocol | in-training probe, pretrained rows: tau; "
           "pairs ordered as the protocol |", "|---|---|---|---|"]
  for t in task_names:
    cells = []
    rows = [r for r in means if r in checks]
    cells.append(f"{self_agreement(results, rows, t):.2f}" if len(rows) > 1 else "n/a")
    for group, score in ((rows, lambda r: checks[r][t]["linear"]),
                         ([r for r in PRETRAINED if r in means and r in last],
                          lambda r: last[r][t])):
      if len(group) < 2:
        cells.append("n/a")
        continue
      protocol = {r: means[r][t] for r in group}
      other = {r: score(r) for r in group}
      pairs = separated_pairs(results, group, t)
      cells.append(f"{kendall_tau(list(protocol.values()), list(other.values())):.2f}; "
                   f"{concordant(pairs, protocol, other)} of {len(pairs)}")
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return lines


def write_report(output: pathlib.Path, results: dict, records: dict, checks: dict,
                 initial: dict | None, task_names: list, setup: dict, times: dict,
                 env: dict) -> None:
  """OUTPUT: command, setup, tables, goals, trend, curves and plots; keeps the notes below the
  marker."""
  config, params = setup["config"], setup["params"]
  final = {row: {s: next((r["loss"] for r in reversed(recs) if r.get("split") == s), None)
                 for s in ("train", "eval")} for row, recs in records.items()}
  m, p = config.model, config.probe
  points = trend(records, task_names, config.batch_size)
  probed_seconds = (p.chunks_per_clip * m.input_shape[0] * features.HOP_LENGTH
                    / features.SAMPLE_RATE)
  overheads = {row: probe_overhead(recs, times.get(f"pretrain {row}"))
               for row, recs in records.items()}
  lines = [
      "# Does pretraining pay, and where does AudioMAE++ beat MAE? (a miniature of the paper's "
      "comparison)", "",
      "Made by `benchmarks/study.py`. Command:", "", f"    {setup['command']}", "",
      f"Machine: {common.describe(env)}. Wall time: {sum(times.values()) / 60:.1f} min in all "
      "(stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").", "",
      "## Setup", "",
      f"- Corpus: {CORPORA[config.data.source]}",
      f"- Models (`configs/study.py`): width {m.width}, depth {m.depth}, {m.num_heads} heads, "
      f"decoder {m.decoder_width} x {m.decoder_depth}; AudioMAE++ (transformer++ blocks, "
      f"{params['AudioMAE++']['encoder'] / 1e6:.2f} M encoder parameters) vs vanilla MAE (ViT "
      f"blocks, {params['MAE']['encoder'] / 1e6:.2f} M), with the paper's positions (fixed "
      "sin-cos tables, no RoPE) and, as an ablation, with rotary 2-D patch positions in encoder "
      f"and decoder; all {config.num_train_steps} steps of batch {config.batch_size}, peak lr "
      f"{config.base_lr * config.batch_size / 256:g}.",
      "- Rows: the four pretrained encoders; the AudioMAE++ encoder at its random initialisation "
      "(the parameters its pretraining started from); the log-mel baseline (per-clip mean and "
      "standard deviation over time of the 80 log-mel bins, 160 values).",
      f"- Tasks: {', '.join(task_names)}; kws and pitch from `make_suite.py` (a HEAR-format task "
      f"generator outside the repository, `../shared/evalsuite/`) `--per_class "
      f"{setup['per_class']} --seed 0` (voices / instruments disjoint across splits), drums "
      "and the packaged tasks on real recordings from Debian packages (`audiomaepp/evaluation/"
      "drums.py`, `packaged_tasks.py`; kits, recordings and prompts disjoint across splits; data "
      "cards in docs/data.md); HEAR probe protocol of `audiomaepp.tools.evaluate --order="
      f"{setup['order']}`, {setup['seeds']} seeds; test accuracy (%), mean ± 95% CI over "
      "seeds; s(m): the paper's normalised score over these rows.",
      f"- Probes while pretraining (`config.probe`): every task at steps {p.every_steps} x 1, 2, "
      f"4, ... and the last, {p.max_clips} clips of each (class-balanced; the first "
      f"{probed_seconds:g} s of each clip), scored on every one of them by ridge classifiers "
      "fit on the task's other splits (`audiomaepp.train.probes`).", "",
      "## Results", "", *score_table(results, task_names), "",
      f"![scores]({output.stem}_scores.png)", "",
      "## Against the paper's Tiny rows", "",
      "The sign of AudioMAE++ - MAE (primary rows, no RoPE) per task family, next to the "
      "paper's Table 2 (AudioMAE++-Tiny vs MAE-Tiny):", "",
      *paper_table(results, task_names), "",
      "## Goals", "",
      *[f"- {'pending' if ok is None else 'met' if ok else '**missed**'}: {goal} ({numbers})"
        for goal, ok, numbers in goals(results, task_names)], "",
      "## Trend: probes while pretraining", "",
      "AudioMAE++ - MAE of the in-training probes (score on every probed clip, percentage "
      "points) at each probed budget; s(m) normalised per task over both models' probes at "
      "every step:", "",
      *(trend_table(points, task_names) if points else ["pending"]), "",
      f"{PRIMARY[0]}'s probes minus the same probe of its encoder at initialisation (the "
      f"parameters its pretraining started from, the {RANDOM_INIT} row), on the same clips:",
      "", *(init_table(init_gaps(records, initial, task_names, config.batch_size), initial,
                       task_names) if initial else ["pending"]), "",
      f"![probes]({output.stem}_probes.png)", "",
      "Probe overhead (probe time / the rest of the run): " + "; ".join(
          f"{row} {v:.1%}" if v is not None else f"{row} pending" for row, v in overheads.items())
      + ".", "",
      "## Does the probe rank as the protocol does?", "",
      "Kendall's tau between the HEAR protocol's ranking of the rows (table above) and the "
      "in-training probe's, on every clip of the task (the representation checks below) and in "
      "the probe of the last step (its subset of clips); and of the pairs of rows the protocol "
      "separates (means further apart than the sum of their CI half-widths), how many the probe "
      "orders the same way. The protocol's own agreement (one seed's ranking against the mean "
      "of the other seeds') bounds what a second measurement can reach:", "",
      *ranking_table(results, checks, records, task_names), "",
      "## Loss", "",
      "Final masked-patch MSE (train / eval): " + "; ".join(
          f"{row} {v['train']:.3f} / {v['eval']:.3f}" for row, v in final.items()
          if v["train"] is not None and v["eval"] is not None) + ".", "",
      f"![loss curves]({output.stem}_loss.png)", "",
      "## Representation checks", "",
      "Not the protocol: the in-training probe on every clip of the task (%) and the effective "
      "rank of the train embeddings (of dim D).", "",
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
