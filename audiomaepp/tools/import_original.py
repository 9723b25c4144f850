"""Imports an original PyTorch AudioMAE++ checkpoint as a workdir that feature extraction restores.

    python -m audiomaepp.tools.import_original --weights=checkpoint.pth \
        --original_args=args.json --output_dir=DIR
    python -m audiomaepp.tools.import_original --weights=checkpoint.pth \
        --config=configs/base.py --output_dir=DIR

With --original_args (the original builder's keyword arguments, as in the fixtures'
`*_config.json`) the model is derived from them; with --config the experiment config names the
model. DIR then holds `config.json` and an Orbax checkpoint (step 0) with the parameters, the same
layout `main.py` writes, so `audiomaepp.hear_api.load_model(DIR)` and `tools.embed` read it.
"""
from absl import flags
from absl import logging
from ml_collections import config_flags

from audiomaepp import original
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

_WEIGHTS = flags.DEFINE_string("weights", None, "Original .pth (needs PyTorch) or .npz file.")
_ORIGINAL_ARGS = flags.DEFINE_string("original_args", None,
                                     "JSON file of the original builder's keyword arguments.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config naming the model.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write the workdir into.")


def main(argv):
  del argv
  if not _WEIGHTS.value or not _OUTPUT_DIR.value:
    raise UserError("--weights and --output_dir are required")
  if (_CONFIG.value is None) == (_ORIGINAL_ARGS.value is None):
    raise UserError("pass exactly one of --config or --original_args")
  config = original.import_to_workdir(_WEIGHTS.value, _OUTPUT_DIR.value, config=_CONFIG.value,
                                      original_args=_ORIGINAL_ARGS.value)
  logging.info("imported %s", _WEIGHTS.value)
  print(f"wrote {_OUTPUT_DIR.value} (model size {config.model.size}, width "
        f"{config.model.width}); restore it with audiomaepp.hear_api.load_model")


if __name__ == "__main__":
  cli.run(main)
