"""Vanilla MAE Tiny: standard pre-norm ViT blocks (exact GELU), the paper's MAE baseline."""
from audiomaepp import experiment


def get_config():
  return experiment.base_config("tiny", block="vit")
