"""Analytic FLOP counts (matmuls and attention; norms, activations and softmax ignored).

One multiply-add counts 2 FLOPs. Training costs 3x the forward pass (forward, and a backward
pass of twice its cost). Used by the trainer for MFU and by `tools.summary`.
"""
from typing import Any

from audiomaepp.models import layers
from audiomaepp.models.config import resolve_model_config


def _block_flops(kind: str, width: int, mlp_ratio: float, tokens: int) -> float:
  """Forward FLOPs of one block on `tokens` tokens of `width` channels."""
  mlp = 2 * tokens * 2 * width * int(width * mlp_ratio)
  attention = 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width
  if kind == "vit":
    return attention + mlp
  swiglu = 2 * tokens * 3 * width * layers.swiglu_hidden(width)
  return mlp + attention + swiglu


def encode_flops_per_sample(model_config: Any) -> float:
  """Forward FLOPs of `encode` (all patches plus cls through the encoder), per sample."""
  c = resolve_model_config(model_config)
  patch_embed = 2 * c.num_patches * c.patch_dim * c.width
  tokens = c.num_patches + 1
  return patch_embed + c.depth * _block_flops(c.encoder_block, c.width, c.mlp_ratio, tokens)


def forward_flops_per_sample(model_config: Any) -> float:
  """Forward FLOPs of a pretraining step per sample: patch embedding of all patches, encoder
  on 1 + kept tokens, decoder on 1 + L tokens (Base: ~20.9 GFLOP)."""
  c = resolve_model_config(model_config)
  encoder_tokens = c.num_keep + 1
  decoder_tokens = c.num_patches + 1
  patch_embed = 2 * c.num_patches * c.patch_dim * c.width
  encoder = c.depth * _block_flops(c.encoder_block, c.width, c.mlp_ratio, encoder_tokens)
  decoder_embed = 2 * encoder_tokens * c.width * c.decoder_width
  decoder = c.decoder_depth * _block_flops(c.decoder_block, c.decoder_width, c.mlp_ratio,
                                           decoder_tokens)
  decoder_pred = 2 * decoder_tokens * c.decoder_width * c.patch_dim
  return patch_embed + encoder + decoder_embed + decoder + decoder_pred


def train_flops_per_sample(model_config: Any) -> float:
  """Training FLOPs per sample: 3 x forward (Base: ~63 GFLOP)."""
  return 3 * forward_flops_per_sample(model_config)
