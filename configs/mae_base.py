"""Vanilla MAE Base: standard pre-norm ViT blocks (exact GELU), the paper's MAE baseline."""
from configs import common


def get_config():
  return common.base_config("base", block="vit")
