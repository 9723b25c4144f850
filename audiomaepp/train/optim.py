"""The pretraining optimiser: AdamW, weight-decay mask, warm-up + half-cosine schedule (the numbers:
docs/reference.md#optimisation)."""
import math
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

from audiomaepp.models import layout


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`base_lr` scaled by the effective batch: base_lr * batch_size * grad_accum_steps / 256."""
  return config.base_lr * config.batch_size * config.grad_accum_steps / 256


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """Train steps (global batches of `batch_size`) per pass over the train split, at least 1."""
  return max(1, num_train_examples // config.batch_size)


def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """Train steps of the whole run: `num_train_steps` when > 0, else `num_epochs` epochs."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch(config, num_train_examples)))


def learning_rate_schedule(config: ml_collections.ConfigDict, num_train_examples: int,
                           total_steps: int) -> optax.Schedule:
  """Learning rate per optimiser update: linear warm-up from 0, then half-cosine to `min_lr`.

  Counted in optimiser updates (one every `grad_accum_steps` train steps): warm-up lasts
  `warmup_epochs` epochs and the cosine ends at the last update of the run.
  """
  accum = config.grad_accum_steps
  updates = max(1, total_steps // accum)
  warmup = min(updates, int(round(config.warmup_epochs
                                  * steps_per_epoch(config, num_train_examples) / accum)))
  peak = peak_learning_rate(config)
  if warmup == 0:
    return optax.cosine_decay_schedule(peak, updates, alpha=config.min_lr / peak if peak else 0.0)
  # optax counts the warm-up inside decay_steps; at least one cosine step keeps it well defined.
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(updates, warmup + 1), end_value=config.min_lr)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: at least 2 dimensions and not named `bias`.

  LayerNorm scales and biases are excluded; patch-embedding kernels, cls and mask tokens are
  decayed (as the original's `param_groups_weight_decay`). Dimensions are counted per block
  (scanned blocks' stacked depth axis does not count).
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: layout.per_block_ndim(path, leaf) >= 2 and path[-1] != "bias"
       for path, leaf in flat.items()})


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with the decay mask, optional global-norm clipping and gradient accumulation."""
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                      mask=decay_mask)
  tx = adamw
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
