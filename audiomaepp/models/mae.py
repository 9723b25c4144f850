"""The masked autoencoder on log-mel patches (AudioMAE++ and vanilla MAE), docs/reference.md#model.

Shapes for the default config: spectrogram (batch, 200 time, 80 mel) -> 4x16 patches on a
50 x 5 grid, 250 tokens time-major (index = t·5 + f); 50 kept at mask ratio 0.8.
"""
import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from audiomaepp.models import blocks
from audiomaepp.models import layers
from audiomaepp.models import layout
from audiomaepp.models.config import FRAME_LAYOUTS, ModelConfig, resolve_model_config


def patchify(spectrogram: jax.Array, patch_size: Tuple[int, int] = (4, 16)) -> jax.Array:
  """(batch, time, mel) or (batch, 1, time, mel) -> (batch, patches, pt·pf), time-major.

  Inside a patch the values are time-major too (pt rows of pf mel bins), as in the original.
  """
  x = spectrogram[:, 0] if spectrogram.ndim == 4 else spectrogram
  batch, time, mel = x.shape
  pt, pf = patch_size
  x = x.reshape(batch, time // pt, pt, mel // pf, pf).transpose(0, 1, 3, 2, 4)
  return x.reshape(batch, (time // pt) * (mel // pf), pt * pf)


def unpatchify(patches: jax.Array, patch_size: Tuple[int, int] = (4, 16),
               grid: Tuple[int, int] = (50, 5)) -> jax.Array:
  """(batch, T·F, pt·pf) -> (batch, T·pt, F·pf): the inverse of `patchify`."""
  batch = patches.shape[0]
  (pt, pf), (nt, nf) = patch_size, grid
  x = patches.reshape(batch, nt, nf, pt, pf).transpose(0, 1, 3, 2, 4)
  return x.reshape(batch, nt * pt, nf * pf)


def masking_noise(rng: jax.Array, batch_size: int, grid: Tuple[int, int],
                  mode: str = "unstructured") -> jax.Array:
  """The original's masking noise, (batch, T·F) float32 ~ U(0, 1) per patch.

  mode: 'unstructured' (noise per patch) or 'timestep' (noise per time step, repeated over its
  frequency patches).
  """
  num_time, num_freq = grid
  if mode == "unstructured":
    return jax.random.uniform(rng, (batch_size, num_time * num_freq))
  if mode == "timestep":
    return jnp.repeat(jax.random.uniform(rng, (batch_size, num_time)), num_freq, axis=1)
  raise ValueError(f"mask mode {mode!r}: expected 'unstructured' or 'timestep'")


def masking_ids_from_noise(noise: jax.Array, num_keep: int
                           ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The masks of `noise` (batch, T·F) as the original's `random_masking` sorts it: the
  `num_keep` patches of smallest noise are kept, in ascending order of noise.

  Returns:
    ids_keep (batch, num_keep) int32, ids_restore (batch, T·F) int32 (the inverse of the
    shuffle), mask (batch, T·F) float32 with 1 for removed patches.
  """
  # Stable sorting keeps the patches of one time step together in 'timestep' mode.
  ids_shuffle = jnp.argsort(noise, axis=1, stable=True).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_shuffle[:, :num_keep], ids_restore, mask_from_ids(ids_restore, num_keep)


def random_masking_ids(rng: jax.Array, batch_size: int, grid: Tuple[int, int], num_keep: int,
                       mode: str = "unstructured") -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Random masks as in the original: noise ~ U(0, 1), keep the `num_keep` smallest.

  Args:
    rng: PRNG key.
    batch_size: number of masks.
    grid: (time patches, frequency patches).
    num_keep: patches kept per example.
    mode: 'unstructured' (noise per patch) or 'timestep' (noise per time step, shared by its
      frequency patches, so whole time steps are kept or removed when num_keep is a multiple
      of the frequency patches).

  Returns:
    `masking_ids_from_noise(masking_noise(rng, batch_size, grid, mode), num_keep)`.
  """
  return masking_ids_from_noise(masking_noise(rng, batch_size, grid, mode), num_keep)


def mask_from_ids(ids_restore: jax.Array, num_keep: int) -> jax.Array:
  """(batch, patches) float32 mask, 1 where the patch is not among the first num_keep."""
  return (ids_restore >= num_keep).astype(jnp.float32)


def restore_ids_from_keep(ids_keep: jax.Array, num_patches: int) -> jax.Array:
  """A shuffle inverse consistent with `ids_keep` (removed patches follow in index order)."""
  batch, num_keep = ids_keep.shape
  rank = jnp.broadcast_to(num_keep + jnp.arange(num_patches), (batch, num_patches))
  rank = rank.at[jnp.arange(batch)[:, None], ids_keep].set(jnp.arange(num_keep))
  return jnp.argsort(jnp.argsort(rank, axis=1), axis=1).astype(jnp.int32)


def patch_statistics(patches: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Per-patch `(mean, scale)` of `norm_pix_loss` over the last axis: scale is the square root
  of the unbiased variance + 1e-6, as the original's torch.var; targets are
  `(patch - mean) / scale`, and `pred * scale + mean` brings predictions back to input units."""
  mean = patches.mean(axis=-1, keepdims=True)
  return mean, jnp.sqrt(patches.var(axis=-1, keepdims=True, ddof=1) + 1e-6)


def patch_targets(spectrogram: jax.Array, patch_size: Tuple[int, int] = (4, 16),
                  norm_pix: bool = False) -> jax.Array:
  """Reconstruction targets (batch, patches, pt·pf) in float32, standardised per patch when
  `norm_pix` (`patch_statistics`)."""
  target = patchify(spectrogram.astype(jnp.float32), patch_size)
  if norm_pix:
    mean, scale = patch_statistics(target)
    target = (target - mean) / scale
  return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over values of (pred - target)² per patch, averaged over masked patches (float32)."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def rope_positions(mode: str, patch_ids: jax.Array, grid: Tuple[int, int]) -> Optional[jax.Array]:
  """Rotary positions for the sequence [cls, patches `patch_ids`] (batch or 1, 1 + n).

  'sequence' (the original): the index in the current sequence, so after masking the
  rotation does not reflect where a patch lies. 'patch_2d': the patch's true (time, frequency)
  grid position; the cls token gets (0, 0), i.e. it is not rotated. Returns
  (batch or 1, 1 + n, axes) int32, or None for 'none'.
  """
  if mode == "none":
    return None
  if mode == "sequence":
    return jnp.arange(1 + patch_ids.shape[1], dtype=jnp.int32)[None, :, None]
  grid_positions = jnp.stack([patch_ids // grid[1], patch_ids % grid[1]], axis=-1)
  cls = jnp.zeros((patch_ids.shape[0], 1, 2), jnp.int32)
  return jnp.concatenate([cls, grid_positions.astype(jnp.int32)], axis=1)


# Logical axes of the tokens between blocks: (batch, tokens, channels).
ACTIVATION_AXES = ("batch", None, None)


def _constrain(x: jax.Array) -> jax.Array:
  """Shards block-boundary activations as the `batch` rule says (a no-op outside
  `parallel.with_axis_rules`)."""
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _apply_blocks(c: ModelConfig, kind: str, depth: int, num_heads: int, rope: str,
                  x: jax.Array, positions: Optional[jax.Array]) -> jax.Array:
  """`depth` blocks on x, created inside the calling compact module: one scanned module
  `blocks` (parameters stacked on a leading 'layers' axis) or `block_0`.. when unrolled."""
  block = blocks.block_class(kind, c.remat, c.scan_layers)
  kwargs = dict(num_heads=num_heads, mlp_ratio=c.mlp_ratio, dtype=c.compute_dtype,
                attention_impl=c.attention_impl, rope=rope)
  if kind == "plusplus":
    kwargs["swiglu_norm"] = c.swiglu_norm
  x = _constrain(x)
  if not c.scan_layers:
    for i in range(depth):
      x = _constrain(block(name=f"block_{i}", **kwargs)(x, positions))
    return x
  scan = nn.scan(lambda module, carry, positions: (_constrain(module(carry, positions)), None),
                 variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=nn.broadcast, length=depth,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scan(block(name=layout.STACKED, **kwargs), x, positions)
  return x


class Encoder(nn.Module):
  """depth x block, then LayerNorm, on [cls, patch tokens] (a float32 residual stream)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, patch_ids: jax.Array) -> jax.Array:
    """tokens (batch, 1 + n, D) with cls first; patch_ids (batch or 1, n) -> (batch, 1 + n, D)."""
    c = self.config
    positions = rope_positions(c.encoder_rope, patch_ids, c.grid)
    x = _apply_blocks(c, c.encoder_block, c.depth, c.num_heads, c.encoder_rope, tokens,
                      positions)
    return layers.layer_norm("norm", c.compute_dtype)(x)


class Decoder(nn.Module):
  """Linear D -> Dd, mask tokens, unshuffle, 1-D sin-cos table, blocks, LayerNorm, Linear.

  The tokens between the embedding and the final LayerNorm (the residual stream) are float32
  whatever the compute dtype, as under PyTorch autocast.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, encoded: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """encoded (batch, 1 + kept, D), ids_restore (batch, L) -> pred (batch, L, patch_dim)."""
    c = self.config
    batch, tokens, _ = encoded.shape
    num_patches = ids_restore.shape[1]
    x = layers.dense(c.decoder_width, ("embed", None), "embed", c.compute_dtype)(encoded)
    x = x.astype(jnp.float32)
    mask_token = self.param(
        "mask_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, c.decoder_width), jnp.float32)
    mask_tokens = jnp.broadcast_to(mask_token, (batch, num_patches + 1 - tokens, c.decoder_width))
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + layers.sincos_1d_table(c.decoder_width, num_patches)

    positions = rope_positions(c.decoder_rope, jnp.arange(num_patches)[None], c.grid)
    x = _apply_blocks(c, c.decoder_block, c.decoder_depth, c.decoder_num_heads, c.decoder_rope,
                      x, positions)
    x = layers.layer_norm("norm", c.compute_dtype)(x)
    x = layers.dense(c.patch_dim, ("embed", None), "pred", c.compute_dtype)(x)
    return x[:, 1:]


class MaskedAutoencoder(nn.Module):
  """AudioMAE++ / MAE. Methods: `reconstruct` (== __call__) and `encode`.

  Variables: only 'params' (float32). Random masking draws from the 'masking' PRNG stream.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    self.patch_embed = nn.Conv(
        c.width, kernel_size=c.patch_size, strides=c.patch_size, padding="VALID",
        dtype=c.compute_dtype, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.xavier_uniform, (None, None, None, "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
    self.cls_token = self.param(
        "cls_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, c.width), jnp.float32)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)

  def _spectrogram(self, x: jax.Array) -> jax.Array:
    """Accepts (batch, time, mel) or (batch, 1, time, mel); returns (batch, time, mel)."""
    expected = tuple(self.config.input_shape)
    if x.ndim == 4 and x.shape[1] == 1:
      x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"spectrogram of shape {x.shape}: expected (batch, {expected[0]}, "
                       f"{expected[1]}) or (batch, 1, {expected[0]}, {expected[1]}) (time, mel)")
    return x

  def _patch_tokens(self, x: jax.Array) -> jax.Array:
    """(batch, time, mel) -> (batch, L, D) patch embeddings plus the 2-D sin-cos table."""
    c = self.config
    tokens = self.patch_embed(x[..., None].astype(c.compute_dtype))
    tokens = tokens.reshape(x.shape[0], c.num_patches, c.width).astype(jnp.float32)
    return tokens + layers.sincos_2d_table(c.width, c.grid)[1:]

  def _with_cls(self, tokens: jax.Array) -> jax.Array:
    # The cls slot of the positional table is zero, so cls is prepended unchanged.
    cls = jnp.broadcast_to(self.cls_token, (tokens.shape[0], 1, tokens.shape[2]))
    return jnp.concatenate([cls, tokens], axis=1)

  def __call__(self, x: jax.Array, ids_keep: Optional[jax.Array] = None,
               ids_restore: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    """Same as `reconstruct`."""
    return self.reconstruct(x, ids_keep, ids_restore)

  def reconstruct(self, x: jax.Array, ids_keep: Optional[jax.Array] = None,
                  ids_restore: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    """Masks, encodes the kept patches and reconstructs all patches.

    Args:
      x: (batch, time, mel) or (batch, 1, time, mel) log-mel.
      ids_keep: optional (batch, kept) patch indices to keep (the order is the encoder's
        sequence order); drawn from the 'masking' stream when neither id array is given.
      ids_restore: optional (batch, L) inverse shuffle; derived from ids_keep when omitted
        (ids_keep is then derived from it when only ids_restore is given).

    Returns:
      encoder_out (batch, 1 + kept, D) cls first, after the final norm; pred and target
      (batch, L, patch_dim) (target normalised per patch when norm_pix_loss); mask (batch, L)
      1 = removed; ids_keep; ids_restore; loss: scalar MSE over removed patches (float32).
    """
    c = self.config
    x = self._spectrogram(x)
    batch = x.shape[0]
    if ids_keep is None and ids_restore is None:
      ids_keep, ids_restore, mask = random_masking_ids(
          self.make_rng("masking"), batch, c.grid, c.num_keep, c.mask_mode)
    else:
      if ids_keep is None:
        ids_keep = jnp.argsort(ids_restore, axis=1)[:, :c.num_keep]
      elif ids_restore is None:
        ids_restore = restore_ids_from_keep(ids_keep, c.num_patches)
      mask = mask_from_ids(ids_restore, ids_keep.shape[1])
    tokens = jnp.take_along_axis(self._patch_tokens(x), ids_keep[:, :, None], axis=1)
    encoder_out = self.encoder(self._with_cls(tokens), ids_keep)
    pred = self.decoder(encoder_out, ids_restore)

    target = patch_targets(x, c.patch_size, c.norm_pix_loss)
    loss = masked_mse(pred, target, mask)
    return dict(encoder_out=encoder_out, pred=pred, target=target, mask=mask,
                ids_keep=ids_keep, ids_restore=ids_restore, loss=loss)

  def encode(self, x: jax.Array, frame_layout: Optional[str] = None) -> Dict[str, jax.Array]:
    """Encodes all patches without masking.

    Args:
      x: (batch, time, mel) or (batch, 1, time, mel) log-mel.
      frame_layout: overrides config.frame_layout: 'time_major' (frame t = the 5 frequency
        tokens of time step t) or 'original' (the original code's frequency-major regrouping:
        frame j = tokens j, T+j, 2T+j, ... of the time-major sequence).

    Returns:
      tokens (batch, T, F, D) after the final norm, cls dropped; cls (batch, D);
      frames (batch, T, F·D).
    """
    c = self.config
    layout = c.frame_layout if frame_layout is None else frame_layout
    if layout not in FRAME_LAYOUTS:
      raise ValueError(f"frame_layout={layout!r}: expected one of {list(FRAME_LAYOUTS)}")
    x = self._spectrogram(x)
    batch = x.shape[0]
    patch_ids = jnp.arange(c.num_patches)[None]
    out = self.encoder(self._with_cls(self._patch_tokens(x)), patch_ids)
    sequence = out[:, 1:]
    num_time, num_freq = c.grid
    if layout == "time_major":
      frames = sequence.reshape(batch, num_time, num_freq * c.width)
    else:
      frames = sequence.reshape(batch, num_freq, num_time, c.width).transpose(0, 2, 1, 3)
      frames = frames.reshape(batch, num_time, num_freq * c.width)
    return dict(tokens=sequence.reshape(batch, num_time, num_freq, c.width), cls=out[:, 0],
                frames=frames)


def build_model(model_config: Any) -> MaskedAutoencoder:
  """The linen module for `config.model` (validated first: bad configs fail here)."""
  return MaskedAutoencoder(resolve_model_config(model_config))


def unbox(variables: Any) -> Any:
  """Strips `nn.Partitioned` boxes (logical axis metadata) from `init`'s output."""
  return nn.meta.unbox(variables)


@functools.lru_cache(maxsize=None)
def _param_shapes(config: ModelConfig) -> Any:
  model = MaskedAutoencoder(config)
  x = jax.ShapeDtypeStruct((1, *config.input_shape), jnp.float32)

  def init(x):
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    return unbox(model.init(rngs, x))["params"]

  return jax.eval_shape(init, x)


def param_shapes(model_config: Any) -> Any:
  """The parameter pytree as `jax.ShapeDtypeStruct`s (no initialisation; cached)."""
  return _param_shapes(resolve_model_config(model_config))


def abstract_params(model: Any) -> Any:
  """`param_shapes` of a MaskedAutoencoder (or model config): a restore target for Orbax."""
  return param_shapes(model.config if isinstance(model, MaskedAutoencoder) else model)


def positional_table_size(model_config: Any) -> int:
  """Values in the two fixed sin-cos tables (not parameters; the original stores them)."""
  c = resolve_model_config(model_config)
  return (c.num_patches + 1) * (c.width + c.decoder_width)


def _frozen_size(tree: Any) -> int:
  """Values of parameters kept fixed in training (RoPE frequencies)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return sum(int(np.prod(leaf.shape)) for path, leaf in leaves
             if path and getattr(path[-1], "key", None) == "rope_freqs")


def parameter_counts(model_config: Any) -> Dict[str, int]:
  """Parameter counts as the original reports them.

  total: everything the original state dict holds (parameters, sin-cos tables, RoPE
  frequencies, the unused norm3); trainable: without tables and RoPE frequencies; encoder and
  decoder: trainable, encoder including patch embedding and cls; fixed: total - trainable;
  per_module: trainable per top-level parameter.
  """
  shapes = param_shapes(model_config)
  per_module = {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
                - _frozen_size(tree) for name, tree in shapes.items()}
  fixed = positional_table_size(model_config) + _frozen_size(shapes)
  trainable = sum(per_module.values())
  return dict(
      total=trainable + fixed, trainable=trainable, fixed=fixed,
      encoder=per_module["patch_embed"] + per_module["cls_token"] + per_module["encoder"],
      decoder=per_module["decoder"], per_module=per_module)
