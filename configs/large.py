"""AudioMAE++ Large: transformer++ encoder and decoder, decoder width 512 (paper Table 2)."""
from audiomaepp import experiment


def get_config():
  config = experiment.base_config("large")
  config.model.decoder_width = 512
  return config
