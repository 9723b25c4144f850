"""Ablation (paper Table 4): AudioMAE++ Large with a 768-wide decoder."""
from audiomaepp import experiment


def get_config():
  config = experiment.base_config("large")
  config.model.decoder_width = 768
  return config
