"""Fine-tuning as a task of the runner: a pretrained encoder and a linear head trained on labelled
clips. `run(config, workdir)` is what `main.py` calls when `config.task == 'finetune'`.

The runner gives it every guarantee of pretraining (see `runner.py`): sharded state on the
config's mesh, global batches independent of the host count, exact resume from the newest intact
checkpoint (the batch of step s and every random draw derive from the seed and s), SIGTERM
checkpoints and stops, one-line errors before anything is written. The pretrained encoder
(`config.init_from`) is restored once for every host. Every `eval_every_steps` the validation
split is scored (mAP and per-class AP for multi-label tasks, top-1 for single-label ones) to the
console, TensorBoard and metrics.jsonl, and the parameters with the best validation score so far
are kept in `workdir/best/` beside the latest checkpoints; at the end the best parameters are
scored on the test split and `workdir/summary.json` records the best step with its validation
and test scores (`SUMMARY_FILE`), which the last console lines repeat.
"""
import functools
import json
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from audiomaepp import checkpointing
from audiomaepp import metrics as metrics_lib
from audiomaepp import models
from audiomaepp import native_io
from audiomaepp import parallel
from audiomaepp.data import labelled
from audiomaepp.data import pipeline
from audiomaepp.evaluation import scores
from audiomaepp.errors import UserError
from audiomaepp.models import classifier as classifier_lib
from audiomaepp.train import finetune_step as step_lib
from audiomaepp.train import runner
from audiomaepp.train import workdir as workdir_lib
from audiomaepp.train.checkpointer import BEST_DIR, BestCheckpoint
from audiomaepp.train.runner import ConfigError, RunResult

SUMMARY_FILE = "summary.json"


def validate_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """Checks the fine-tuning fields (and the shared ones) before anything is read or compiled;
  `read_task` checks the data fields."""
  model_config = runner.validate_common(config)
  ft = config.finetune
  checks = {"layer_decay": 0 < ft.layer_decay <= 1, "mixup": ft.mixup >= 0,
            "label_smoothing": 0 <= ft.label_smoothing < 1, "timem": ft.timem >= 0,
            "freqm": ft.freqm >= 0, "ema_decay": 0 <= ft.ema_decay < 1}
  for name, ok in checks.items():
    if not ok:
      raise ConfigError(f"config.finetune.{name}={ft[name]} is out of range")
  check_eval_crops(config.data.eval_crops, "config.data.eval_crops")
  try:
    step_lib.build_model(config, model_config, 1)
  except UserError as e:
    raise ConfigError(str(e)) from None
  return model_config


def check_eval_crops(crops: int, field: str) -> None:
  """One line naming `field` unless `crops` (evaluation crops per clip) is at least 1."""
  if crops < 1:
    raise ConfigError(f"{field}={crops}: expected 1 or more crops per clip")


def read_task(config: ml_collections.ConfigDict) -> labelled.LabelledSet:
  """The labelled dataset, with the number of classes checked against `config.num_classes` and
  the splits named in the config against its splits."""
  try:
    task = labelled.open_labelled(config.data)
  except UserError as e:
    raise ConfigError(str(e)) from None
  if config.num_classes > 0 and config.num_classes != len(task.vocabulary):
    raise ConfigError(f"config.num_classes={config.num_classes} differs from the "
                      f"{len(task.vocabulary)} classes of {task.location}")
  run_splits(config, task)
  return task


def run_splits(config: ml_collections.ConfigDict, task: labelled.LabelledSet) -> dict[str, str]:
  """The 'train', 'eval' and 'test' splits of this run: `config.data.fold`'s run of a task of
  folds (train on the others, validate on the next fold, test on this one), else the
  `config.data.*_split` fields. Comma-separated names are joined."""
  fold = config.data.get("fold")
  if fold is None or fold < 0:
    chosen = {"train": config.data.train_split, "eval": config.data.eval_split,
              "test": config.data.test_split}
  elif not task.folds:
    raise ConfigError(f"config.data.fold={fold}: {task.location} is not a task of folds")
  elif fold >= len(task.folds):
    raise ConfigError(f"config.data.fold={fold}: {task.location} has {len(task.folds)} folds "
                      f"(0 to {len(task.folds) - 1})")
  else:
    run = task.folds[fold]
    chosen = {"train": ",".join(run["train"]), "eval": ",".join(run["valid"]),
              "test": ",".join(run["test"])}
  for name, value in chosen.items():
    unknown = [s for s in labelled.split_names(value) if s not in task.splits]
    if unknown:
      raise ConfigError(f"config.data.{name}_split={value!r}: {unknown[0]!r} is not a split of "
                        f"{task.location} (it has {task.splits})")
    if name != "test" and not labelled.split_names(value):
      raise ConfigError(f"config.data.{name}_split is empty: name the split(s) to {name} on")
  return chosen


def pretrained_encoder(config: ml_collections.ConfigDict, target: Any) -> dict:
  """The encoder parameters of `config.init_from` (a workdir or a native model folder; decoder
  dropped), checked against `target`."""
  source = config.init_from
  if native_io.is_folder(source):
    if config.init_step is not None:
      raise ConfigError(f"config.init_from={source} is an exported model folder, which holds one "
                        f"step; drop config.init_step={config.init_step}")
    try:
      _, params = native_io.read(source)
    except UserError as e:
      raise ConfigError(f"config.init_from={source}: {e}") from None
  else:
    try:
      recorded = checkpointing.load_config(source)
      pretrained_model = models.resolve_model_config(recorded.model)
    except (FileNotFoundError, UserError) as e:
      raise ConfigError(f"config.init_from={source}: {e}") from None
    try:
      params = checkpointing.restore_params(source, models.abstract_params(pretrained_model),
                                            step=config.init_step)
    except FileNotFoundError as e:
      raise ConfigError(f"config.init_from={source}: {e}") from None
  try:
    return classifier_lib.encoder_from_pretrained(params, target, f"config.init_from={source}")
  except UserError as e:
    raise ConfigError(str(e)) from None


def score_predictions(logits: np.ndarray, targets: np.ndarray, multilabel: bool
                      ) -> dict[str, Any]:
  """mAP and per-class AP (multi-label) or top-1 accuracy (single-label); 'score' is the one that
  selects the best checkpoint."""
  if multilabel:
    per_class = np.asarray(jax.vmap(scores.average_precision, in_axes=(1, 1))(
        logits, targets > 0.5))
    return {"mAP": float(per_class.mean()), "per_class_ap": per_class.tolist(),
            "score": float(per_class.mean())}
  top1 = float(scores.top1_accuracy(logits, targets))
  return {"top1_acc": top1, "score": top1}


def predict(predict_fn: Any, params: Any, split: labelled.LabelledSplit, batch_size: int,
            crop_frames: int, sharding: Any, block: tuple[int, int], crops: int = 1
            ) -> np.ndarray:
  """Logits (n, classes) of every clip of `split`, gathered on every host: of the centre crop,
  or the mean over `crops` crops spread over the clip (`labelled.eval_batches`)."""
  outputs = []
  for batch in labelled.eval_batches(split, crop_frames, batch_size, block, crops):
    global_batch = pipeline.make_global_batch({"spectrogram": batch["spectrogram"]}, sharding)
    outputs.append(np.asarray(jax.device_get(predict_fn(params, global_batch))))
  return np.concatenate(outputs)[:len(split)]


class FinetuneTask(runner.Task):
  """The classifier of `config.model` (the pretrained encoder of `config.init_from` when set) on
  the labelled clips of `config.data`."""

  batch_keys = ("spectrogram", "targets")
  keeps_best = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.ema = config.finetune.ema_decay > 0
    self.model_config: Optional[models.ModelConfig] = None
    self.model: Optional[classifier_lib.Classifier] = None
    self.data: Optional[labelled.LabelledSet] = None
    self.splits: dict[str, str] = {}
    self._train_split = self._eval_split = None
    self._predict_fn = None
    self._placement: Optional[runner.Placement] = None
    self._writer: Optional[metrics_lib.MetricsWriter] = None
    self._workdir: Optional[str] = None

  @property
  def num_classes(self) -> int:
    return len(self.data.vocabulary)

  def validate(self) -> models.ModelConfig:
    self.model_config = validate_config(self.config)
    return self.model_config

  def open_data(self, workdir: str) -> int:
    self.data = read_task(self.config)
    self._check_resumable(workdir)
    self.splits = run_splits(self.config, self.data)
    try:
      self._train_split = self.data.load(self.splits["train"])
      self._eval_split = self.data.load(self.splits["eval"])
    except UserError as e:
      raise ConfigError(str(e)) from None
    self.model = step_lib.build_model(self.config, self.model_config, self.num_classes)
    logging.info("fine-tuning on %s (%d classes, %s): %d train clips, validating on %s",
                 self.data.name, self.num_classes,
                 "multi-label" if self.data.multilabel else "single-label",
                 len(self._train_split), self.splits["eval"])
    return len(self._train_split)

  def _check_resumable(self, workdir: str) -> None:
    """A workdir with checkpoints resumes only with the same number of classes."""
    if not workdir_lib.has_checkpoints(workdir):
      return
    recorded = checkpointing.load_config(workdir).get("num_classes_resolved")
    if recorded is not None and recorded != self.num_classes:
      raise ConfigError(f"the head restored from {workdir} has {recorded} classes, the task "
                        f"has {self.num_classes}; use a new workdir for another task")

  def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    return step_lib.create_optimizer(self.config, schedule, step_lib.abstract_params(self.model),
                                     self.model_config.depth)

  def init_params(self, rng: jax.Array) -> Any:
    return step_lib.init_params(self.model, rng)

  def pretrained_params(self, abstract_params: Any) -> Optional[dict[str, Any]]:
    return pretrained_encoder(self.config, abstract_params) if self.config.init_from else None

  def record(self) -> ml_collections.ConfigDict:
    record = self.config.copy_and_resolve_references()
    with record.unlocked():
      record.num_classes_resolved = self.num_classes
    return record

  def train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    ft = self.config.finetune
    return functools.partial(step_lib.train_step, model=self.model, tx=tx, schedule=schedule,
                             finetune=ft, multilabel=self.data.multilabel,
                             ema_decay=ft.ema_decay,
                             grad_accum_steps=self.config.grad_accum_steps)

  def start(self, placement: runner.Placement, writer: metrics_lib.MetricsWriter,
            workdir: str) -> None:
    self._placement, self._writer, self._workdir = placement, writer, workdir
    self._predict_fn = placement.jit(
        functools.partial(step_lib.predict_step, model=self.model),
        in_shardings=(placement.state.params, {"spectrogram": placement.batch}),
        out_shardings=placement.replicated)

  def train_batches(self, start_step: int, block: tuple[int, int]) -> Iterator[dict]:
    return labelled.train_iterator(
        self._train_split, self.config.data, batch_size=self.config.batch_size,
        seed=self.config.seed, first_batch=start_step, block=block,
        weighted=self.config.finetune.weighted_sampling, num_classes=self.num_classes)

  def evaluate(self, state: runner.TrainState, step: int) -> dict[str, Any]:
    """Scores the validation split with the evaluated parameters."""
    return self._score("eval", state.eval_params(), self._eval_split, step)

  def finish(self, state: runner.TrainState, result: RunResult,
             best: Optional[BestCheckpoint]) -> None:
    """Scores the best checkpoint on the test split (when the run has one) and writes
    `SUMMARY_FILE`."""
    del state
    if best is None or best.score() is None:
      return
    best_step, params = best.restore(runner.with_shardings(step_lib.abstract_params(self.model),
                                                           self._placement.state.params))
    test_score = None
    if self.splits["test"]:
      try:
        test_split = self.data.load(self.splits["test"])
      except UserError as e:
        raise ConfigError(str(e)) from None
      test_score = self._score("test", params, test_split, result.step)["score"]
    metric = "mAP" if self.data.multilabel else "top1_acc"
    summary = {"task": self.data.name, "metric": metric, "steps": result.step,
               "best_step": best_step, "eval_split": self.splits["eval"],
               "eval_score": best.score(), "test_split": self.splits["test"] or None,
               "test_score": test_score}
    path = checkpointing.workdir_path(self._workdir) / SUMMARY_FILE
    if jax.process_index() == 0:
      path.write_text(json.dumps(summary, indent=1) + "\n")
    test = "no test split" if test_score is None else (
        f"{self.splits['test']} {metric} {test_score:.4f}")
    logging.info("best checkpoint: step %d of %d, %s %s %.4f, %s (%s)", best_step, result.step,
                 self.splits["eval"], metric, summary["eval_score"], test, path)

  def _score(self, name: str, params: Any, split: labelled.LabelledSplit, step: int
             ) -> dict[str, Any]:
    """Scores `split` with `params` and writes the scalars (split `name`) at `step`."""
    logits = predict(self._predict_fn, params, split, self.config.batch_size,
                     self.config.data.crop_frames, self._placement.batch, self._placement.block,
                     self.config.data.eval_crops)
    result = score_predictions(logits, split.targets, self.data.multilabel)
    scalars = {k: v for k, v in result.items() if k not in ("per_class_ap", "score")}
    if self.data.multilabel:
      scalars.update({f"ap/{i}": ap for i, ap in enumerate(result["per_class_ap"])})
    self._writer.write_scalars(step, scalars, split=name)
    return result


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Optional[Callable[[int], None]] = None) -> RunResult:
  """Fine-tunes (or resumes) `config` in `workdir` (see the module docstring)."""
  return runner.run(FinetuneTask(config), workdir, on_step)


def score_workdir(workdir: str, task_dir: Optional[str] = None, split: Optional[str] = None,
                  eval_crops: Optional[int] = None) -> dict[str, Any]:
  """Scores the best checkpoint of a fine-tuning workdir (the latest when it has no best) on
  `split` (default: the run's test split or fold) of the data it was trained on, or of the HEAR
  task folder `task_dir`, with `eval_crops` crops per clip (default: the run's
  `data.eval_crops`).

  Returns the scores (`score_predictions`) plus 'step', 'task' and 'split'.
  """
  config = checkpointing.load_config(workdir)
  if config.get("task") != "finetune":
    raise ConfigError(f"{workdir} is not a fine-tuning workdir (its config.json has no "
                      "task='finetune')")
  if task_dir:
    with config.unlocked():
      config.data.source, config.data.task_dir = "hear", task_dir
  model_config = models.resolve_model_config(config.model)
  task = read_task(config)
  recorded = config.get("num_classes_resolved")
  if recorded is not None and recorded != len(task.vocabulary):
    raise ConfigError(f"the head in {workdir} has {recorded} classes, {task.location} has "
                      f"{len(task.vocabulary)}")
  split = split or run_splits(config, task)["test"]
  if not split:
    raise ConfigError(f"{workdir} was trained without a test split: name the split to score")
  crops = config.data.get("eval_crops", 1) if eval_crops is None else eval_crops
  check_eval_crops(crops, "eval_crops")
  model = step_lib.build_model(config, model_config, len(task.vocabulary))
  abstract = step_lib.abstract_params(model)
  best_dir = checkpointing.workdir_path(workdir) / BEST_DIR
  steps = [int(p.name) for p in best_dir.iterdir() if p.name.isdigit()] if best_dir.exists() else []
  if steps:
    step = max(steps)
    params = checkpointing.restore_params(workdir, abstract, step=step, subdir=BEST_DIR)
  else:
    step = checkpointing.latest_complete_step(workdir)
    params = checkpointing.restore_params(workdir, abstract)
  mesh = parallel.create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  sharding = parallel.batch_sharding(mesh)
  predict_fn = jax.jit(functools.partial(step_lib.predict_step, model=model))
  try:
    data = task.load(split)
  except UserError as e:
    raise ConfigError(str(e)) from None
  logits = predict(predict_fn, params, data, config.batch_size, config.data.crop_frames,
                   sharding, pipeline.host_block(sharding, config.batch_size), crops)
  result = score_predictions(logits, data.targets, task.multilabel)
  return {**result, "step": step, "task": task.name, "split": split, "eval_crops": crops}
