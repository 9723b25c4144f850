"""Prints a model's parameter counts and FLOPs (no weights are created).

  python -m audiomaepp.tools.summary --config=configs/base.py [--json]
"""
import json
import re
from typing import Any, Dict

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from audiomaepp import models
from audiomaepp.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def summarize(model_config: Any) -> Dict[str, Any]:
  """Parameter counts (as the original counts them) and analytic FLOPs per sample."""
  config = models.resolve_model_config(model_config)
  counts = models.parameter_counts(config)
  return dict(
      params_total=counts["total"],
      params_trainable=counts["trainable"],
      params_encoder=counts["encoder"],
      params_decoder=counts["decoder"],
      params_fixed=counts["fixed"],
      params_per_module=counts["per_module"],
      flops_per_sample=models.train_flops_per_sample(config),
      forward_flops_per_sample=models.forward_flops_per_sample(config),
      encode_flops_per_sample=models.encode_flops_per_sample(config),
  )


def _size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _module_rows(model_config: Any) -> list:
  """(name, count) per top-level module and its children; blocks folded into one row."""
  rows = []
  for name, tree in models.param_shapes(model_config).items():
    rows.append((name, _size(tree)))
    if not isinstance(tree, dict):
      continue
    block_sizes = [_size(v) for k, v in tree.items() if re.fullmatch(r"block_\d+", k)]
    if block_sizes:
      rows.append((f"  {name}/block_* ({len(block_sizes)} x {block_sizes[0]:,})",
                   sum(block_sizes)))
    rows += [(f"  {name}/{k}", _size(v)) for k, v in tree.items()
             if not re.fullmatch(r"block_\d+", k)]
  return rows


def table(model_config: Any) -> str:
  """A human-readable table of `summarize` plus per-module parameter counts."""
  summary = summarize(model_config)
  lines = [f"{'module':<40}{'parameters':>16}"]
  lines += [f"{name:<40}{count:>16,}" for name, count in _module_rows(model_config)]
  lines.append("-" * 56)
  for key in ("params_trainable", "params_encoder", "params_decoder", "params_fixed",
              "params_total"):
    lines.append(f"{key:<40}{summary[key]:>16,}")
  for key in ("forward_flops_per_sample", "flops_per_sample", "encode_flops_per_sample"):
    lines.append(f"{key:<40}{summary[key] / 1e9:>10.2f} GFLOP")
  return "\n".join(lines)


def main(argv):
  del argv
  model_config = models.resolve_model_config(_CONFIG.value.model)
  if _JSON.value:
    print(json.dumps(summarize(model_config), sort_keys=True))
  else:
    print(table(model_config))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
