"""Fine-tuning: the optimiser with layer-wise lr decay, augmentation and the pure steps.

Every random draw of step s (SpecAugment masks, the mixup weight, drop-path) comes from
fold_in(seed key, s), so a resumed run repeats exactly what the uninterrupted one would do.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from audiomaepp.models import classifier as classifier_lib
from audiomaepp.models import layout
from audiomaepp.train import optim
from audiomaepp.train.state import TrainState

_SPECAUGMENT_STREAM, _MIXUP_STREAM, _DROPOUT_STREAM = 1, 2, 3


def layer_scales(params: Any, depth: int, layer_decay: float, freeze_encoder: bool = False
                 ) -> Any:
  """Learning-rate multiplier of every parameter (arrays broadcastable to it).

  Layer ids as BEiT / MAE's `param_groups_lrd`: patch embedding and cls token 0, block i i+1,
  the final norm and the head depth+1; the scale is layer_decay ** (depth + 1 - id). Stacked
  block parameters get a (depth, 1, ...) scale. With `freeze_encoder` everything but the head
  has scale 0 (a linear probe with the same recipe).
  """
  flat = traverse_util.flatten_dict(params)
  scale = lambda layer_id: layer_decay ** (depth + 1 - layer_id)
  scales = {}
  for path, leaf in flat.items():
    if path[0] == "head":
      value = np.float32(1.0)
    elif freeze_encoder:
      value = np.float32(0.0)
    elif path[0] in ("patch_embed", "cls_token"):
      value = np.float32(scale(0))
    elif path[1] == layout.STACKED:
      value = np.asarray([scale(i + 1) for i in range(depth)], np.float32).reshape(
          (depth,) + (1,) * (leaf.ndim - 1))
    elif path[1].startswith("block_"):
      value = np.float32(scale(int(path[1].split("_")[1]) + 1))
    else:  # encoder/norm
      value = np.float32(scale(depth + 1))
    scales[path] = value
  return traverse_util.unflatten_dict(scales)


def _scale_updates(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its scale (after AdamW: the lr and weight decay of a parameter
  group, as in PyTorch's per-group lr)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on biases, norms or the cls token (MAE's fine-tuning
  `no_weight_decay`)."""
  mask = traverse_util.flatten_dict(optim.decay_mask(params))
  return traverse_util.unflatten_dict(
      {path: value and path[0] != "cls_token" for path, value in mask.items()})


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                     params: Any, depth: int) -> optax.GradientTransformation:
  """AdamW, optional clipping, layer-wise lr decay and gradient accumulation."""
  ft = config.finetune
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                      mask=decay_mask)
  parts = [adamw, _scale_updates(layer_scales(params, depth, ft.layer_decay,
                                              ft.freeze_encoder))]
  if config.grad_clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  tx = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


def init_params(model: nn.Module, rng: jax.Array) -> Any:
  """The classifier's initial parameters, boxed with their logical-axis metadata."""
  return model.init({"params": rng},
                    jnp.zeros((1, *model.config.input_shape), jnp.float32))["params"]


def abstract_params(model: nn.Module) -> Any:
  """The classifier's parameters as `jax.ShapeDtypeStruct`s (unboxed; nothing is computed)."""
  return jax.eval_shape(lambda: nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))


def spec_augment(rng: jax.Array, spectrogram: jax.Array, max_time: int, max_freq: int
                 ) -> jax.Array:
  """One time and one frequency mask per example (torchaudio's TimeMasking / FrequencyMasking:
  width ~ U[0, max), start ~ U[0, size - width)), set to 0, the clip mean of standardised
  input. (batch, time, mel) -> same."""
  batch, time, mel = spectrogram.shape
  keep = jnp.ones(spectrogram.shape, bool)
  for axis, (size, max_width, key) in enumerate(
      ((time, max_time, 0), (mel, max_freq, 1)), start=1):
    if max_width <= 0:
      continue
    width_key, start_key = jax.random.split(jax.random.fold_in(rng, key))
    width = jnp.floor(jax.random.uniform(width_key, (batch,)) * max_width)
    start = jnp.floor(jax.random.uniform(start_key, (batch,)) * (size - width))
    index = jnp.arange(size, dtype=jnp.float32)
    masked = (index[None] >= start[:, None]) & (index[None] < (start + width)[:, None])
    shape = (batch, size, 1) if axis == 1 else (batch, 1, size)
    keep = keep & ~masked.reshape(shape)
  return jnp.where(keep, spectrogram, 0.0)


def mixup(rng: jax.Array, spectrogram: jax.Array, targets: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """timm's Mixup in 'batch' mode: one lam ~ Beta(alpha, alpha) per batch, each example mixed
  with the batch reversed, targets likewise."""
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda x: lam * x + (1.0 - lam) * x[::-1]
  return mix(spectrogram), mix(targets)


def loss_fn(logits: jax.Array, targets: jax.Array, multilabel: bool) -> jax.Array:
  """Mean binary cross-entropy over classes (multi-label) or softmax cross-entropy, float32."""
  if multilabel:
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
  return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               finetune: ml_collections.ConfigDict, multilabel: bool, ema_decay: float,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on batch 'spectrogram' (batch, time, mel), 'targets' (batch, classes).

  Augmentation in order: SpecAugment, mixup (`finetune.mixup` > 0), label smoothing
  (single-label tasks only: smoothed targets (1 - e) y + e / classes).
  """
  key = jax.random.fold_in(rng, state.step)
  x = spec_augment(jax.random.fold_in(key, _SPECAUGMENT_STREAM), batch["spectrogram"],
                   finetune.timem, finetune.freqm)
  targets = batch["targets"].astype(jnp.float32)
  if not multilabel and finetune.label_smoothing > 0:
    targets = optax.smooth_labels(targets, finetune.label_smoothing)
  if finetune.mixup > 0:
    x, targets = mixup(jax.random.fold_in(key, _MIXUP_STREAM), x, targets, finetune.mixup)

  def objective(params):
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": jax.random.fold_in(key, _DROPOUT_STREAM)})
    return loss_fn(logits.astype(jnp.float32), targets, multilabel)

  if finetune.freeze_encoder:
    # Only the head's gradient: back-propagating into the encoder, whose updates are scaled
    # to 0, would cost two thirds of the step for nothing.
    frozen = {k: v for k, v in state.params.items() if k != "head"}
    loss, head_grads = jax.value_and_grad(lambda head: objective({**frozen, "head": head}))(
        state.params["head"])
    grads = {**jax.tree.map(jnp.zeros_like, frozen), "head": head_grads}
  else:
    loss, grads = jax.value_and_grad(objective)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "lr": jnp.asarray(schedule(state.step // grad_accum_steps), jnp.float32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema), metrics


def predict_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
  """Logits (batch, classes) float32 without augmentation or drop-path. A 'spectrogram' of
  several crops per clip (batch, crops, time, mel) gives the mean of each clip's crops' logits:
  the linear head on the mean of their pooled features, as the HEAR protocol averages a clip's
  chunk embeddings."""
  spectrogram = batch["spectrogram"]
  logits = model.apply({"params": params}, spectrogram.reshape(-1, *spectrogram.shape[-2:]),
                       train=False).astype(jnp.float32)
  logits = logits.reshape(*spectrogram.shape[:-2], -1)
  return logits if spectrogram.ndim == 3 else logits.mean(axis=1)


def build_model(config: ml_collections.ConfigDict, model_config: Any,
                num_classes: int) -> classifier_lib.Classifier:
  """The classifier of a fine-tuning config."""
  return classifier_lib.build_classifier(model_config, num_classes, config.finetune.pool,
                                         config.finetune.drop_path)
