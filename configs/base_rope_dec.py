"""Ablation (paper Table 3): AudioMAE++ Base with RoPE in the decoder only."""
from audiomaepp import experiment


def get_config():
  config = experiment.base_config("base")
  config.model.decoder_rope = "sequence"
  return config
