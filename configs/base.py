"""AudioMAE++ Base: transformer++ encoder and decoder (paper Table 2)."""
from audiomaepp import experiment


def get_config():
  return experiment.base_config("base")
