"""The fine-tuning loop: a pretrained encoder and a linear head trained on labelled clips.

`run(config, workdir)` is what `main.py` calls when `config.task == 'finetune'`. It keeps the
pretraining loop's guarantees (see `loop.py`): sharded state on the config's mesh, global batches
independent of the host count, exact resume from the newest intact checkpoint (the batch of step s
and every random draw derive from the seed and s), SIGTERM checkpoints and stops, one-line errors
before anything is written. Every `eval_every_steps` the validation split is scored (mAP and
per-class AP for multi-label tasks, top-1 for single-label ones) to the console, TensorBoard and
metrics.jsonl, and the parameters with the best validation score so far are kept in
`workdir/best/` beside the latest checkpoints; at the end the best parameters are scored on the
test split.
"""
import functools
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from audiomaepp import checkpointing
from audiomaepp import metrics as metrics_lib
from audiomaepp import models
from audiomaepp import parallel
from audiomaepp import profiling
from audiomaepp.data import labelled
from audiomaepp.data import pipeline
from audiomaepp.evaluation import scores
from audiomaepp.errors import UserError
from audiomaepp.models import classifier as classifier_lib
from audiomaepp.train import finetune_step as step_lib
from audiomaepp.train import loop
from audiomaepp.train import optim

BEST_DIR = "best"
ConfigError = loop.ConfigError


def validate_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """Checks the fine-tuning fields (and the shared ones) before anything is read or compiled;
  `read_task` checks the data fields."""
  model_config = loop.validate_common(config)
  ft = config.finetune
  checks = {"layer_decay": 0 < ft.layer_decay <= 1, "mixup": ft.mixup >= 0,
            "label_smoothing": 0 <= ft.label_smoothing < 1, "timem": ft.timem >= 0,
            "freqm": ft.freqm >= 0, "ema_decay": 0 <= ft.ema_decay < 1}
  for name, ok in checks.items():
    if not ok:
      raise ConfigError(f"config.finetune.{name}={ft[name]} is out of range")
  try:
    step_lib.build_model(config, model_config, 1)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return model_config


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


def _check_resumable(workdir: str, model_config: models.ModelConfig, num_classes: int) -> None:
  """A workdir with checkpoints resumes only with the same model and number of classes."""
  loop._check_same_model(workdir, model_config)  # pylint: disable=protected-access
  if checkpointing.latest_complete_step(workdir) is None:
    return
  recorded = checkpointing.load_config(workdir)
  recorded_classes = recorded.get("num_classes_resolved")
  if recorded_classes is not None and recorded_classes != num_classes:
    raise ConfigError(f"the head restored from {workdir} has {recorded_classes} classes, the task "
                      f"has {num_classes}; use a new workdir for another task")


def pretrained_encoder(config: ml_collections.ConfigDict, target: Any) -> dict:
  """The encoder parameters of `config.init_from` (decoder dropped), checked against `target`."""
  source = config.init_from
  try:
    recorded = checkpointing.load_config(source)
    pretrained_model = models.resolve_model_config(recorded.model)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.init_from={source}: {e}") from None
  try:
    params = checkpointing.restore_params(source, models.abstract_params(pretrained_model),
                                          step=config.init_step)
  except FileNotFoundError as e:
    raise ConfigError(f"config.init_from={source}: {e}") from None
  try:
    return classifier_lib.encoder_from_pretrained(params, target, f"config.init_from={source}")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def state_shardings(model: Any, tx: Any, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict, ema: bool) -> tuple[Any, Any]:
  """(abstract FinetuneState, its NamedShardings) under the config's logical axis rules."""
  create = functools.partial(step_lib.create_state, model, tx, ema=ema)
  abstract_state = jax.eval_shape(create, jax.random.PRNGKey(0))
  shape = (1, *model.config.input_shape)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                            jax.numpy.zeros(shape)))["params"]
  params = parallel.param_shardings(boxed, mesh, parallel.axis_rules(config))
  replicated = parallel.replicated(mesh)
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  shardings = step_lib.FinetuneState(step=replicated, params=params, opt_state=opt_state,
                                     ema_params=params if ema else {})
  return abstract_state, shardings


class BestCheckpoint:
  """The parameters with the best validation score, in `workdir/best/` (one step kept)."""

  def __init__(self, workdir: str):
    self.manager = ocp.CheckpointManager(
        checkpointing.workdir_path(workdir) / BEST_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["score"], best_mode="max",
            enable_async_checkpointing=False, create=True))

  def score(self) -> Optional[float]:
    """The best validation score so far (None before the first save)."""
    step = self.manager.best_step()
    return None if step is None else float(self.manager.metrics(step)["score"])

  def offer(self, step: int, params: Any, score: float) -> bool:
    """Saves `params` if `score` beats the best so far; returns whether it did."""
    best = self.score()
    if best is not None and score <= best:
      return False
    self.manager.save(step, args=ocp.args.Composite(
        **{checkpointing.PARAMS_ITEM: ocp.args.StandardSave(params)}),
                      metrics={"score": float(score)}, force=True)
    self.manager.wait_until_finished()
    return True

  def restore(self, abstract_params: Any) -> tuple[int, Any]:
    """(step, parameters) of the best checkpoint, shaped and sharded like `abstract_params`."""
    step = self.manager.best_step()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{checkpointing.PARAMS_ITEM: ocp.args.StandardRestore(abstract_params)}))
    return step, restored[checkpointing.PARAMS_ITEM]

  def close(self) -> None:
    self.manager.close()


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
            crop_frames: int, sharding: Any, block: tuple[int, int]) -> np.ndarray:
  """Logits (n, classes) of every clip of `split` (centre crops), gathered on every host."""
  outputs = []
  for batch in labelled.eval_batches(split, crop_frames, batch_size, block):
    global_batch = pipeline.make_global_batch({"spectrogram": batch["spectrogram"]}, sharding)
    outputs.append(np.asarray(jax.device_get(predict_fn(params, global_batch))))
  return np.concatenate(outputs)[:len(split)]


def _evaluate(name: str, predict_fn: Any, params: Any, split: labelled.LabelledSplit,
              config: ml_collections.ConfigDict, sharding: Any, block: tuple[int, int],
              multilabel: bool, step: int, writer: metrics_lib.MetricsWriter) -> dict[str, Any]:
  """Scores `split` with `params` and writes the scalars (split `name`) at `step`."""
  logits = predict(predict_fn, params, split, config.batch_size, config.data.crop_frames,
                   sharding, block)
  result = score_predictions(logits, split.targets, multilabel)
  scalars = {k: v for k, v in result.items() if k not in ("per_class_ap", "score")}
  if multilabel:
    scalars.update({f"ap/{i}": ap for i, ap in enumerate(result["per_class_ap"])})
  writer.write_scalars(step, scalars, split=name)
  return result


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Optional[Callable[[int], None]] = None) -> loop.RunResult:
  """Fine-tunes (or resumes) `config` in `workdir`; see the module docstring."""
  model_config = validate_config(config)
  loop._check_workdir(workdir)  # pylint: disable=protected-access
  task = read_task(config)
  num_classes = len(task.vocabulary)
  multilabel = task.multilabel
  _check_resumable(workdir, model_config, num_classes)
  is_main = jax.process_index() == 0
  if is_main:
    loop._check_writable(workdir)  # pylint: disable=protected-access
  splits = run_splits(config, task)
  train_split = task.load(splits["train"])
  eval_split = task.load(splits["eval"])

  mesh = parallel.create_mesh(config.mesh)
  model = step_lib.build_model(config, model_config, num_classes)
  total_steps = optim.total_train_steps(config, len(train_split))
  schedule = optim.learning_rate_schedule(config, len(train_split), total_steps)
  abstract_params = jax.eval_shape(
      lambda: models.unbox(model.init({"params": jax.random.PRNGKey(0)},
                                      jax.numpy.zeros((1, *model_config.input_shape))))["params"])
  tx = step_lib.create_optimizer(config, schedule, abstract_params, model_config.depth)
  ema = config.finetune.ema_decay > 0
  abstract_state, shardings = state_shardings(model, tx, mesh, config, ema)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  encoder = pretrained_encoder(config, abstract_params) if config.init_from else None
  logging.info("fine-tuning %s params on %s (%d classes, %s), %d train clips, %d steps",
               f"{optim.count_params(abstract_params):,}", task.name, num_classes,
               "multi-label" if multilabel else "single-label", len(train_split), total_steps)

  checkpointer = loop._Checkpointer(workdir, config.keep_checkpoints)  # pylint: disable=protected-access
  best = BestCheckpoint(workdir)
  with_shardings = lambda abstract, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
  abstract_p, abstract_rest = abstract_state.checkpoint_items()
  params_sh, rest_sh = shardings.checkpoint_items()
  try:
    restored = checkpointing.restore_with_fallback(
        checkpointer.manager, with_shardings(abstract_p, params_sh),
        with_shardings(abstract_rest, rest_sh))
  except RuntimeError as e:
    raise loop.TrainingError(str(e)) from None
  if is_main:
    config_record = config.copy_and_resolve_references()
    with config_record.unlocked():
      config_record.num_classes_resolved = num_classes
    loop._record_config(workdir, config_record)  # pylint: disable=protected-access
  if restored is None:
    state = _initial_state(model, tx, shardings, init_rng, ema, encoder)
    start_step = 0
  else:
    state = step_lib.FinetuneState.from_checkpoint_items(restored.params, restored.train_state)
    start_step = restored.step
    logging.info("resumed from checkpoint step %d", start_step)

  rules = parallel.axis_rules(config)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  replicated = parallel.replicated(mesh)
  train_fn = jax.jit(
      parallel.with_axis_rules(functools.partial(
          step_lib.train_step, model=model, tx=tx, schedule=schedule, finetune=config.finetune,
          multilabel=multilabel, ema_decay=config.finetune.ema_decay,
          grad_accum_steps=config.grad_accum_steps), mesh, rules),
      in_shardings=(shardings, {"spectrogram": batch_sharding, "targets": batch_sharding},
                    replicated),
      out_shardings=(shardings, replicated), donate_argnums=0)
  predict_fn = jax.jit(
      parallel.with_axis_rules(functools.partial(step_lib.predict_step, model=model), mesh,
                               rules),
      in_shardings=(shardings.params, {"spectrogram": batch_sharding}), out_shardings=replicated)
  block = pipeline.host_block(batch_sharding, config.batch_size)
  rng = jax.device_put(train_rng, replicated)
  writer = metrics_lib.MetricsWriter(workdir, start_step, enabled=is_main)
  watcher = loop._PreemptionWatcher(checkpointer.manager)  # pylint: disable=protected-access
  evaluate = functools.partial(_evaluate, predict_fn=predict_fn, config=config,
                               sharding=batch_sharding, block=block, multilabel=multilabel,
                               writer=writer)
  profiler = profiling.StepProfiler(config.profile_steps, workdir)
  result = loop.RunResult(step=start_step, checkpoint_step=checkpointer.latest_step())
  pending, window = [], []
  try:
    for step in range(start_step + 1, total_steps + 1):
      if on_step is not None:
        on_step(step)
      host_rows = labelled.train_batch(train_split, config.data.crop_frames, config.batch_size,
                                       config.seed, step - 1, block,
                                       config.finetune.weighted_sampling)
      batch = pipeline.make_global_batch(host_rows, batch_sharding)
      profiler.before(step)
      state, step_metrics = train_fn(state, batch, rng)
      profiler.after(step, step_metrics)
      pending.append(step_metrics)
      result.step = step
      log_now = loop._due(step, config.log_every_steps, total_steps)  # pylint: disable=protected-access
      save_now = loop._due(step, config.checkpoint_every_steps, total_steps)  # pylint: disable=protected-access
      stop_now = watcher.requested(step)
      if log_now or save_now or stop_now:
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        loop._check_finite(fetched, step - len(fetched) + 1, checkpointer.latest_step())  # pylint: disable=protected-access
        window.extend(fetched)
        pending = []
        result.final_loss = fetched[-1]["loss"]
      if log_now:
        writer.write_scalars(step, loop._summarise(window))  # pylint: disable=protected-access
        window = []
      if not stop_now and loop._due(step, config.eval_every_steps, total_steps):  # pylint: disable=protected-access
        out = evaluate("eval", params=state.eval_params(), split=eval_split, step=step)
        if best.offer(step, state.eval_params(), out["score"]):
          logging.info("best %s so far: %.4f at step %d", splits["eval"], out["score"],
                       step)
      if save_now or stop_now:
        checkpointer.save(step, state)
      if stop_now:
        result.preempted = True
        break
    error = checkpointer.wait()
    result.checkpoint_step = checkpointer.latest_step()
    if error and result.checkpoint_step != result.step:
      raise loop.CheckpointError(error)
    if not result.preempted and splits["test"] and best.score() is not None:
      best_step, params = best.restore(with_shardings(abstract_p, params_sh))
      test_split = task.load(splits["test"])
      out = evaluate("test", params=params, split=test_split, step=total_steps)
      logging.info("test %s of the best checkpoint (step %d): %.4f",
                   "mAP" if multilabel else "top-1", best_step, out["score"])
  finally:
    profiler.close()
    watcher.close()
    checkpointer.close()
    best.close()
    writer.close()
  return result


def _initial_state(model: Any, tx: Any, shardings: Any, rng: jax.Array, ema: bool,
                   encoder: Optional[dict]) -> step_lib.FinetuneState:
  """Random initialisation, with the pretrained encoder's parameters put in when given.

  The key and the encoder (restored on one device) are placed first, the key replicated and each
  encoder parameter with its own sharding (FSDP: never whole on one device), on every process.
  """
  create = functools.partial(step_lib.create_state, model, tx, ema=ema)
  rng = jax.device_put(jax.device_get(rng), shardings.step)
  if encoder is not None:
    encoder = jax.device_put(jax.device_get(encoder),
                             {name: shardings.params[name] for name in encoder})

  def initial(rng, encoder):
    state = create(rng)
    if encoder is None:
      return state
    params = {**state.params, **encoder}
    return state.replace(params=params, opt_state=tx.init(params),
                         ema_params=jax.tree.map(jax.numpy.copy, params) if ema else {})

  return jax.jit(initial, out_shardings=shardings)(rng, encoder)



def score_workdir(workdir: str, task_dir: Optional[str] = None, split: Optional[str] = None
                  ) -> dict[str, Any]:
  """Scores the best checkpoint of a fine-tuning workdir (the latest when it has no best) on
  `split` (default: the run's test split or fold) of the data it was trained on, or of the HEAR
  task folder `task_dir`.

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
  model = step_lib.build_model(config, model_config, len(task.vocabulary))
  abstract = jax.eval_shape(
      lambda: models.unbox(model.init({"params": jax.random.PRNGKey(0)},
                                      jax.numpy.zeros((1, *model_config.input_shape))))["params"])
  best_dir = checkpointing.workdir_path(workdir) / BEST_DIR
  steps = [int(p.name) for p in best_dir.iterdir() if p.name.isdigit()] if best_dir.exists() else []
  if steps:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
    with ocp.CheckpointManager(best_dir, options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False)) as manager:
      step = max(steps)
      params = manager.restore(step, args=ocp.args.Composite(
          **{checkpointing.PARAMS_ITEM: ocp.args.StandardRestore(target)}))[
              checkpointing.PARAMS_ITEM]
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
                   sharding, pipeline.host_block(sharding, config.batch_size))
  result = score_predictions(logits, data.targets, task.multilabel)
  return {**result, "step": step, "task": task.name, "split": split}
