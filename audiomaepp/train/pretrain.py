"""Pretraining (MAE / AudioMAE++) as a task of the runner: `run(config, workdir)` is what
`main.py` calls.

The task reads unlabelled log-mel shards through the Grain pipeline (data/pipeline.py), trains
with `step.train_step` and evaluates the masked-patch loss of `eval_batches` held-out batches
with fixed masks, drawing the reconstruction of the first clip (`workdir/reconstructions/`), and
every `probe.every_steps` scores linear probes of the encoder on HEAR tasks (`train/probes.py`).
"""
import functools
import itertools
import os
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax

from audiomaepp import metrics as metrics_lib
from audiomaepp import models
from audiomaepp import visualize
from audiomaepp.data import pipeline
from audiomaepp.errors import UserError
from audiomaepp.train import optim
from audiomaepp.train import probes
from audiomaepp.train import runner
from audiomaepp.train import step as step_lib
from audiomaepp.train.runner import ConfigError, RunResult

RECONSTRUCTION_DIR = "reconstructions"
# Eval masks come from this fixed stream (folded with the batch index), the same at every eval.
EVAL_MASK_STREAM = 0x5EED


def validate_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """Checks the config against the devices and the data before anything is compiled.

  Raises:
    ConfigError: one line naming the field and what was expected.
  """
  model_config = runner.validate_common(config)
  try:
    probes.validate(config)
  except UserError as e:
    raise ConfigError(str(e)) from None
  check_data(config)
  return model_config


def check_data(config: ml_collections.ConfigDict) -> None:
  """The dataset must exist (TFDS shards) and hold the train split and, when the run evaluates
  (`eval_batches` > 0), the eval split, both non-empty. The built-in corpora are built later, by
  `open_data`, with both splits."""
  data = config.data
  if data.source in pipeline.BUILT_IN:
    return
  try:
    path = pipeline.dataset_path(data)
  except UserError as e:
    raise ConfigError(str(e)) from None
  splits = {"train_split": data.train_split}
  if config.eval_batches > 0:
    splits["eval_split"] = data.eval_split
  for field, split in splits.items():
    try:
      problem = (f"split {split!r} of {path} is empty"
                 if pipeline.num_examples(data, split) == 0 else None)
    except UserError as e:  # no such split
      problem = str(e)
    if problem:
      hint = ("; set --config.eval_batches=0 to train without evaluation"
              if field == "eval_split" else "")
      raise ConfigError(f"config.data.{field}={split!r}: {problem}{hint}")


class PretrainTask(runner.Task):
  """The masked autoencoder of `config.model` on the unlabelled clips of `config.data`."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    try:
      self.model_config = models.resolve_model_config(config.model)
    except UserError as e:
      raise ConfigError(str(e)) from None
    self.model = models.build_model(self.model_config)
    self._eval_fn = None
    self._eval_input: Optional[EvalInput] = None
    self._writer: Optional[metrics_lib.MetricsWriter] = None
    self._placement: Optional[runner.Placement] = None
    self._probes: Optional[probes.Probes] = None
    self._total_steps = 0
    self._workdir = ""

  def validate(self) -> models.ModelConfig:
    return validate_config(self.config)

  def open_data(self, workdir: str) -> int:
    del workdir
    try:
      pipeline.ensure_dataset(self.config.data)
    except UserError as e:
      raise ConfigError(str(e)) from None
    num_train = pipeline.num_examples(self.config.data, self.config.data.train_split)
    self._total_steps = optim.total_train_steps(self.config, num_train)
    return num_train

  def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optim.create_optimizer(self.config, schedule)

  def init_params(self, rng: jax.Array) -> Any:
    return step_lib.init_params(self.model, rng, tuple(self.model_config.input_shape))

  def flops_per_sample(self) -> Optional[float]:
    return models.train_flops_per_sample(self.model_config)

  def train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    return functools.partial(step_lib.train_step, model=self.model, tx=tx, schedule=schedule,
                             grad_accum_steps=self.config.grad_accum_steps)

  def start(self, placement: runner.Placement, writer: metrics_lib.MetricsWriter,
            workdir: str) -> None:
    self._placement, self._writer, self._workdir = placement, writer, workdir
    if self.config.eval_batches > 0:
      self._eval_fn = placement.jit(
          functools.partial(step_lib.eval_step, model=self.model),
          in_shardings=(placement.state.params, {"spectrogram": placement.batch},
                        placement.replicated),
          out_shardings=placement.replicated)
      self._eval_input = EvalInput(self.config, placement.block)
    if probes.task_dirs(self.config):
      self._probes = probes.Probes(self.config, self.model, placement)

  def train_batches(self, start_step: int, block: tuple[int, int]) -> Iterator[dict]:
    return pipeline.create_iterator(
        self.config.data, split=self.config.data.train_split, batch_size=self.config.batch_size,
        seed=self.config.seed, train=True, first_batch=start_step, shard_index=block[0],
        shard_count=block[1])

  def evaluates_at(self, step: int, total_steps: int) -> bool:
    return self._loss_due(step) or self._probes_due(step)

  def _loss_due(self, step: int) -> bool:
    return (self._eval_input is not None
            and runner.due(step, self.config.eval_every_steps, self._total_steps))

  def _probes_due(self, step: int) -> bool:
    return (self._probes is not None and self._probes.active
            and probes.due(step, self.config.probe, self._total_steps))

  def evaluate(self, state: runner.TrainState, step: int) -> Optional[dict[str, Any]]:
    """Whichever is due at `step`: the validation loss over `eval_batches` held-out batches
    (fixed masks) with a reconstruction picture, and the probes (split 'probe' of the metrics,
    'probe' of the result)."""
    result = {}
    if self._loss_due(step):
      result["loss"] = self._eval_loss(state, step)
    if self._probes_due(step):
      scores = self._probes.run(state.params, step)
      if scores:
        self._writer.write_scalars(step, scores, split="probe")
        result["probe"] = {k: v for k, v in scores.items() if k != "seconds"}
    return result or None

  def _eval_loss(self, state: runner.TrainState, step: int) -> float:
    config = self.config
    mask_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_MASK_STREAM)
    losses, first = [], None
    for index, batch in enumerate(self._eval_input.batches()):
      out = self._eval_fn(state.params,
                          self._placement.global_batch({"spectrogram": batch["spectrogram"]}),
                          jax.random.fold_in(mask_key, index))
      losses.append(out["loss"])
      if first is None:
        first = out
    loss = float(np.mean(jax.device_get(losses)))
    self._writer.write_scalars(step, {"loss": loss}, split="eval")
    if self._writer.enabled:
      first = jax.device_get(first)
      image = visualize.plot_reconstruction(
          first["spectrogram"], first["pixel_mask"], first["reconstruction"],
          os.path.join(self._workdir, RECONSTRUCTION_DIR, f"step_{step:08d}.png"),
          title=f"step {step}, eval loss {loss:.4f}")
      self._writer.write_image("eval/reconstruction", step, image)
    return loss

  def close(self) -> None:
    if self._eval_input is not None:
      self._eval_input.close()


class EvalInput:
  """This host's rows of the first `config.eval_batches` global batches of the eval split, the
  same at every evaluation: one iterator (with its Grain workers), made at the first eval."""

  def __init__(self, config: ml_collections.ConfigDict, block: tuple[int, int]):
    self._config = config
    self._block = block
    self._iterator = None

  def batches(self) -> Iterator[dict]:
    """The evaluation batches, in the same order every time."""
    if self._iterator is None:
      self._iterator = pipeline.create_iterator(
          self._config.data, split=self._config.data.eval_split,
          batch_size=self._config.batch_size, seed=self._config.seed, train=False,
          num_batches=self._config.eval_batches, shard_index=self._block[0],
          shard_count=self._block[1])
    return itertools.islice(self._iterator, self._config.eval_batches)

  def close(self) -> None:
    """Stops the iterator's workers."""
    if self._iterator is not None:
      self._iterator.close()


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Optional[Callable[[int], None]] = None) -> RunResult:
  """Pretrains (or resumes) `config` in `workdir` (see `runner.run` for the guarantees)."""
  return runner.run(PretrainTask(config), workdir, on_step)

