"""Ablation (paper Table 3): AudioMAE++ Base with RoPE in the decoder only."""
from configs import common


def get_config():
  config = common.base_config("base")
  config.model.decoder_rope = "sequence"
  return config
