"""Ablation (paper Table 4): AudioMAE++ Large with a 384-wide decoder."""
from configs import common


def get_config():
  config = common.base_config("large")
  config.model.decoder_width = 384
  return config
