"""AudioMAE++ Tiny: transformer++ encoder and decoder (paper Table 2)."""
from configs import common


def get_config():
  return common.base_config("tiny")
