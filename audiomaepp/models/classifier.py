"""The classifier of fine-tuning: the encoder on every patch (no masking) and a linear head.

Parameter names equal the masked autoencoder's for the shared parts (`patch_embed`, `cls_token`,
`encoder/...` in either block layout), so a pretrained encoder loads as it is; the decoder is not
part of it and `head/{kernel,bias}` is new. Drop-path (stochastic depth) drops a whole block's
residual update per example, with rates rising linearly over depth from 0 to `drop_path`
(timm's schedule; timm drops each residual branch of a block independently, here the block's
sublayers are dropped together).
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from audiomaepp.errors import UserError
from audiomaepp.models import blocks
from audiomaepp.models import layers
from audiomaepp.models import layout
from audiomaepp.models import mae
from audiomaepp.models.config import ModelConfig

POOLS = ("mean", "cls")
ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")
# MAE / AudioMAE fine-tuning initialise the new head with trunc_normal_(std=2e-5).
HEAD_INIT_STD = 2e-5


def drop_path_rates(rate: float, depth: int) -> np.ndarray:
  """Per-block drop probabilities: linear from 0 (first block) to `rate` (last), as timm."""
  return np.linspace(0.0, rate, depth, dtype=np.float32)


def _drop_path(before: jax.Array, after: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """`after` with its residual update `after - before` dropped per example with prob. `rate`
  and rescaled by 1 / (1 - rate) where kept."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (before.shape[0],) + (1,) * (before.ndim - 1))
  return before + jnp.where(mask, (after - before) / jnp.maximum(keep, 1e-6), 0.0)


class ClassifierEncoder(nn.Module):
  """The pretraining `Encoder` (same parameters) with drop-path between blocks."""
  config: ModelConfig
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, patch_ids: jax.Array, train: bool) -> jax.Array:
    """tokens (batch, 1 + n, D) cls first -> (batch, 1 + n, D) after the final LayerNorm."""
    c = self.config
    positions = mae.rope_positions(c.encoder_rope, patch_ids, c.grid)
    stochastic = train and self.drop_path > 0
    rates = jnp.asarray(drop_path_rates(self.drop_path, c.depth))
    block = blocks.block_class(c.encoder_block, c.remat, c.scan_layers)
    kwargs = dict(num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dtype=c.compute_dtype,
                  attention_impl=c.attention_impl, rope=c.encoder_rope)
    if c.encoder_block == "plusplus":
      kwargs["swiglu_norm"] = c.swiglu_norm
    constrain = lambda x: nn.with_logical_constraint(x, mae.ACTIVATION_AXES)
    x = constrain(tokens)
    if c.scan_layers:
      def body(module, carry, positions, rate):
        out = module(carry, positions)
        if stochastic:
          out = _drop_path(carry, out, rate, module.make_rng("dropout"))
        return constrain(out), None

      scan = nn.scan(body, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, 0), length=c.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scan(block(name=layout.STACKED, **kwargs), x, positions, rates)
    else:
      for i in range(c.depth):
        out = block(name=f"block_{i}", **kwargs)(x, positions)
        if stochastic:
          out = _drop_path(x, out, rates[i], self.make_rng("dropout"))
        x = constrain(out)
    return layers.layer_norm("norm", c.compute_dtype)(x)


class Classifier(nn.Module):
  """Log-mel (batch, time, mel) -> logits (batch, num_classes) float32.

  The head reads the mean of the patch tokens (`pool='mean'`, AudioMAE's default `global_pool`)
  or the cls token (`pool='cls'`). Drop-path draws from the 'dropout' PRNG stream when `train`.
  """
  config: ModelConfig
  num_classes: int
  pool: str = "mean"
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = self.config
    expected = tuple(c.input_shape)
    if x.ndim != 3 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"spectrogram of shape {x.shape}: expected (batch, {expected[0]}, "
                       f"{expected[1]}) (time, mel)")
    patch_embed = nn.Conv(
        c.width, kernel_size=c.patch_size, strides=c.patch_size, padding="VALID",
        dtype=c.compute_dtype, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.xavier_uniform, (None, None, None, "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)), name="patch_embed")
    tokens = patch_embed(x[..., None].astype(c.compute_dtype))
    tokens = tokens.reshape(x.shape[0], c.num_patches, c.width).astype(jnp.float32)
    tokens = tokens + layers.sincos_2d_table(c.width, c.grid)[1:]
    cls = self.param("cls_token",
                     layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, c.width), jnp.float32)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls, (x.shape[0], 1, c.width)), tokens], axis=1)
    out = ClassifierEncoder(c, self.drop_path, name="encoder")(
        tokens, jnp.arange(c.num_patches)[None], train)
    pooled = out[:, 1:].mean(axis=1) if self.pool == "mean" else out[:, 0]
    head = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(nn.initializers.truncated_normal(HEAD_INIT_STD),
                                       ("embed", None)),
        bias_init=layers.partitioned(nn.initializers.zeros, (None,)), name="head")
    return head(pooled.astype(jnp.float32))


def build_classifier(model_config: ModelConfig, num_classes: int, pool: str = "mean",
                     drop_path: float = 0.0) -> Classifier:
  """The classifier module; UserError (one line, naming the field) for bad arguments."""
  if pool not in POOLS:
    raise UserError(f"config.finetune.pool={pool!r}: expected one of {list(POOLS)}")
  if not 0.0 <= drop_path < 1.0:
    raise UserError(f"config.finetune.drop_path={drop_path}: expected a rate in [0, 1)")
  if num_classes < 1:
    raise UserError(f"num_classes={num_classes}: expected at least one class")
  return Classifier(model_config, num_classes, pool, drop_path)


def encoder_from_pretrained(pretrained: Mapping[str, Any], target: Mapping[str, Any],
                            source: str) -> dict:
  """The encoder parameters of a pretrained masked autoencoder (decoder dropped), in the block
  layout of `target` (the classifier's parameters, arrays or shapes), checked against it.

  Raises:
    UserError: one line naming `source` and the first parameter that is missing or whose
      shape differs.
  """
  missing = [k for k in ENCODER_KEYS if k not in pretrained]
  if missing:
    raise UserError(f"{source} holds no {missing[0]!r} parameters: not an AudioMAE++ / MAE "
                     "checkpoint")
  scanned = layout.STACKED in target["encoder"]
  encoder = layout.to_layout({k: pretrained[k] for k in ENCODER_KEYS}, scanned)
  got = traverse_util.flatten_dict(encoder, sep="/")
  want = traverse_util.flatten_dict({k: target[k] for k in ENCODER_KEYS}, sep="/")
  for name, leaf in want.items():
    if name not in got:
      raise UserError(f"the encoder of {source} does not fit config.model: it has no "
                       f"parameter {name}; use the pretrained run's model fields")
    if tuple(got[name].shape) != tuple(leaf.shape):
      raise UserError(f"the encoder of {source} does not fit config.model: {name} has shape "
                       f"{tuple(got[name].shape)} there, {tuple(leaf.shape)} in the config; use "
                       "the pretrained run's model fields")
  extra = sorted(set(got) - set(want))
  if extra:
    raise UserError(f"the encoder of {source} does not fit config.model: it has parameter "
                     f"{extra[0]} the config's encoder lacks; use the pretrained run's model fields")
  return {k: encoder[k] for k in ENCODER_KEYS}
