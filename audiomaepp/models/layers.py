"""Layers of the transformer blocks: LayerNorm, MLP, SwiGLU, attention, RoPE, sin-cos tables.

Parameters carry logical axis names (`nn.with_logical_partitioning`): 'embed' (model width),
'mlp' (hidden units of MLP/SwiGLU), 'heads' (fused q/k/v or attention output channels). They
map to mesh axes through `config.logical_axis_rules`; `init` returns `nn.Partitioned` boxes
(use `audiomaepp.models.unbox` for plain arrays; `apply` accepts either).
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0
ROPE_AXES = {"sequence": 1, "patch_2d": 2}  # position axes per RoPE mode

xavier_uniform = nn.initializers.xavier_uniform()


def partitioned(init: Callable, names: Sequence[Optional[str]]) -> Callable:
  """An initializer whose parameter is boxed with logical axis `names`."""
  return nn.with_logical_partitioning(init, tuple(names))


def layer_norm(name: str, dtype: Any, axis_name: str = "embed") -> nn.LayerNorm:
  """LayerNorm as in the original (eps 1e-6, scale 1, bias 0); statistics in float32."""
  return nn.LayerNorm(
      epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
      scale_init=partitioned(nn.initializers.ones, (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros, (axis_name,)), name=name)


def dense(features: int, names: Sequence[Optional[str]], name: str, dtype: Any) -> nn.Dense:
  """Linear layer with bias: Xavier-uniform weight, zero bias (the original's init)."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=partitioned(xavier_uniform, names),
      bias_init=partitioned(nn.initializers.zeros, names[-1:]), name=name)


class Mlp(nn.Module):
  """Linear(d -> hidden) -> activation -> Linear(hidden -> d)."""
  hidden: int
  activation: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, tokens, d) -> (batch, tokens, d)."""
    h = self.activation(dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype)(x))
    return dense(x.shape[-1], ("mlp", "embed"), "fc2", self.dtype)(h)


class SwiGLU(nn.Module):
  """W_o · LN(SiLU(W_g x) ⊙ W_v x), LayerNorm over the hidden units (transformer++ FFN)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, tokens, d) -> (batch, tokens, d)."""
    value = dense(self.hidden, ("embed", "mlp"), "value", self.dtype)(x)
    gate = dense(self.hidden, ("embed", "mlp"), "gate", self.dtype)(x)
    h = layer_norm("norm", self.dtype, axis_name="mlp")(nn.silu(gate) * value)
    return dense(x.shape[-1], ("mlp", "embed"), "out", self.dtype)(h)


def swiglu_hidden(width: int) -> int:
  """SwiGLU hidden units: int(4 · d · 2/3), as the original computes it (768 -> 2048)."""
  return int(4 * width * (2 / 3))


def rope_frequencies(dim: int) -> np.ndarray:
  """theta^(-2i/dim), i = 0..dim/2-1, float32 (dim // 2,): the original's `rope.freqs`."""
  exponents = np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / dim
  return (1.0 / ROPE_THETA ** exponents).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
  """Rotary embedding of queries or keys over adjacent channel pairs.

  Args:
    x: (batch, tokens, heads, head_dim).
    positions: (batch or 1, tokens, axes) integer positions.
    freqs: (head_dim // 2,) frequencies, split into `axes` equal parts: pair i of part a is
      rotated by positions[..., a] * freqs[i] (one axis: the original's rotary-embedding-torch
      layout).

  Returns:
    x rotated, same shape and dtype (computed in float32).
  """
  num_axes = positions.shape[-1]
  per_axis = freqs.reshape(num_axes, -1)
  angles = positions[..., None].astype(jnp.float32) * per_axis.astype(jnp.float32)
  angles = jnp.repeat(angles.reshape(*positions.shape[:-1], -1), 2, axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def rope_init(head_dim: int, mode: str) -> Callable:
  """Initializer of `rope_freqs`: the standard frequencies for each position axis of `mode`."""
  num_axes = ROPE_AXES[mode]

  def init(key, shape, dtype=jnp.float32):
    del key
    freqs = np.tile(rope_frequencies(head_dim // num_axes), num_axes)
    return jnp.asarray(freqs.reshape(shape), dtype)

  return init


class MultiHeadAttention(nn.Module):
  """Self-attention with a fused qkv projection (bias), scale head_dim^-1/2, optional RoPE.

  With `rope` ('sequence' | 'patch_2d') the module holds `rope_freqs` (head_dim // 2,): a
  parameter so that original checkpoints load exactly (the original stores them per block),
  kept fixed by a stop_gradient (the original does not train them either).
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  rope: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, rope_positions: Optional[jax.Array] = None) -> jax.Array:
    """(batch, tokens, d) -> (batch, tokens, d); `rope_positions` as in `apply_rope`."""
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, ("embed", "heads"), "qkv", self.dtype)(x)
    # The fused output is laid out (3, heads, head_dim), as in the original's reshape.
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.rope != "none":
      freqs = self.param("rope_freqs", partitioned(rope_init(head_dim, self.rope), (None,)),
                         (head_dim // 2,), jnp.float32)
      freqs = jax.lax.stop_gradient(freqs)
      q = apply_rope(q, rope_positions, freqs)
      k = apply_rope(k, rope_positions, freqs)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return dense(width, ("heads", "embed"), "out", self.dtype)(out.reshape(batch, tokens, width))


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p·ω) | cos(p·ω)] with ω_i = 10000^(-i/(dim/2)): (len(positions), dim).

  Computed in float32 like the original, which makes the tables equal to its stored ones bit
  for bit (float64 differs by ~1e-6).
  """
  omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
  omega = np.float32(1.0) / np.float32(10000) ** omega
  angles = np.outer(positions.reshape(-1).astype(np.float32), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=None)
def sincos_2d_table(dim: int, grid: tuple) -> np.ndarray:
  """Encoder table (1 + T·F, dim): zero cls row, then patches time-major.

  The first dim/2 channels encode the frequency patch index, the last dim/2 the time index
  (MAE's layout, docs/reference.md#model). Read-only float32.
  """
  time_index, freq_index = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  table = np.concatenate([_sincos_1d(dim // 2, freq_index), _sincos_1d(dim // 2, time_index)],
                         axis=1)
  return _frozen(np.concatenate([np.zeros((1, dim)), table]).astype(np.float32))


@functools.lru_cache(maxsize=None)
def sincos_1d_table(dim: int, length: int) -> np.ndarray:
  """Decoder table (1 + length, dim): zero cls row, then positions 0..length-1. Read-only."""
  table = _sincos_1d(dim, np.arange(length))
  return _frozen(np.concatenate([np.zeros((1, dim)), table]).astype(np.float32))


def _frozen(array: np.ndarray) -> np.ndarray:
  # Cached tables are shared: make accidental in-place edits fail loudly.
  array.setflags(write=False)
  return array
