"""Transformer blocks: the standard pre-norm ViT block and the transformer++ (macaron) block.

The residual stream stays in the dtype it comes in (float32 from the model): each sublayer
computes in `dtype` and its output is cast back before the add, as PyTorch autocast does.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from audiomaepp.models import layers


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU with the erf form (PyTorch's nn.GELU default), not the tanh approximation."""
  return nn.gelu(x, approximate=False)


class ViTBlock(nn.Module):
  """x += MHA(LN1 x); x += MLP_GELU(LN2 x)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  rope: str = "none"  # 'none' | 'sequence' | 'patch_2d' (see layers.MultiHeadAttention)

  @nn.compact
  def __call__(self, x: jax.Array, rope_positions: Optional[jax.Array] = None) -> jax.Array:
    """(batch, tokens, d) -> (batch, tokens, d)."""
    width = x.shape[-1]
    attention = layers.MultiHeadAttention(self.num_heads, self.dtype, self.attention_impl,
                                          self.rope, name="attn")
    x = x + attention(layers.layer_norm("norm1", self.dtype)(x), rope_positions).astype(x.dtype)
    mlp = layers.Mlp(int(width * self.mlp_ratio), exact_gelu, self.dtype, name="mlp")
    return x + mlp(layers.layer_norm("norm2", self.dtype)(x)).astype(x.dtype)


class PlusPlusBlock(nn.Module):
  """Transformer++ block (paper Eq. 1-3, as the original implements it).

  x += 0.5 · MLP_SiLU(LN1 x); x += MHA(LN2 x); x += SwiGLU(LN x), where LN is LN2 again for
  swiglu_norm='shared' (the original; `norm3` then holds parameters that are never used) and
  `norm3` for swiglu_norm='separate'.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  swiglu_norm: str = "shared"
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  rope: str = "none"  # 'none' | 'sequence' | 'patch_2d' (see layers.MultiHeadAttention)

  @nn.compact
  def __call__(self, x: jax.Array, rope_positions: Optional[jax.Array] = None) -> jax.Array:
    """(batch, tokens, d) -> (batch, tokens, d)."""
    width = x.shape[-1]
    ffn1 = layers.Mlp(int(width * self.mlp_ratio), nn.silu, self.dtype, name="ffn1")
    x = x + 0.5 * ffn1(layers.layer_norm("norm1", self.dtype)(x)).astype(x.dtype)
    norm2 = layers.layer_norm("norm2", self.dtype)
    attention = layers.MultiHeadAttention(self.num_heads, self.dtype, self.attention_impl,
                                          self.rope, name="attn")
    x = x + attention(norm2(x), rope_positions).astype(x.dtype)
    norm3 = layers.layer_norm("norm3", self.dtype)
    if self.swiglu_norm == "separate":
      swiglu_in = norm3(x)
    else:
      swiglu_in = norm2(x)
      if self.is_initializing():
        # Create norm3's parameters anyway: the original checkpoints hold them and parameter
        # counts include them. The output is discarded.
        norm3(x)
    swiglu = layers.SwiGLU(layers.swiglu_hidden(width), self.dtype, name="swiglu")
    return x + swiglu(swiglu_in).astype(x.dtype)


_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_class(kind: str, remat: str = "none", scanned: bool = False) -> type:
  """The block module class for `kind` ('plusplus' | 'vit'), rematerialised with policy `remat`
  ('none' | 'full' | 'dots'). Under `nn.scan` (`scanned`) common subexpressions may be shared
  across the remat boundary: the scan's loop already keeps XLA from hoisting them."""
  cls = {"plusplus": PlusPlusBlock, "vit": ViTBlock}[kind]
  if remat == "none":
    return cls
  return nn.remat(cls, policy=_POLICIES[remat], prevent_cse=not scanned)
