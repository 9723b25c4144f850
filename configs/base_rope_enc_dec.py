"""Ablation (paper Table 3): AudioMAE++ Base with RoPE in the encoder and the decoder.

Positions follow the original (index in the post-masking sequence); set
`--config.model.encoder_rope=patch_2d` for true time/frequency patch positions.
"""
from audiomaepp import experiment


def get_config():
  config = experiment.base_config("base")
  config.model.encoder_rope = "sequence"
  config.model.decoder_rope = "sequence"
  return config
