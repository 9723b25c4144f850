"""AudioMAE++ Large: transformer++ encoder and decoder, decoder width 512 (paper Table 2)."""
from configs import common


def get_config():
  config = common.base_config("large")
  config.model.decoder_width = 512
  return config
