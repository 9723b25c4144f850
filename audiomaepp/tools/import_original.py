"""Imports an original PyTorch AudioMAE++ checkpoint as a workdir that feature extraction restores.

    python -m audiomaepp.tools.import_original --weights=RUN_DIR --output_dir=DIR
    python -m audiomaepp.tools.import_original --weights=checkpoint-99.pth \
        --original_config=configs/maepp_tiny_200_16x4.py --output_dir=DIR
    python -m audiomaepp.tools.import_original --weights=model.pth \
        --original_args=args.json --output_dir=DIR
    python -m audiomaepp.tools.import_original --weights=model.pth \
        --config=configs/base.py --output_dir=DIR

--weights: a bare state dict (.pth or .npz), the original trainer's checkpoint
(`{'model', 'optimizer', 'epoch', 'scaler', 'args'}`, read without running pickled code), a
`{'state_dict': ...}` file, or an original run directory (its newest
`checkpoints/checkpoint-<epoch>.pth`). The model comes from --original_config (an official config
file: its `model.arch` and `model.model_args`), --original_args (the builder's keyword arguments
as JSON; an "arch" entry supplies the size), --config (our experiment config), or, with none of
them, from the trainer checkpoint's saved args, which otherwise cross-check the given model.
DIR then holds `config.json` and an Orbax checkpoint (step 0) with the parameters, the layout
`main.py` writes, so `audiomaepp.hear_api.load_model(DIR)` and `tools.embed` read it.
"""
from absl import flags
from ml_collections import config_flags

from audiomaepp import original
from audiomaepp import original_io
from audiomaepp.errors import UserError
from audiomaepp.models.config import resolve_model_config
from audiomaepp.tools import cli

_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Original .pth (needs PyTorch), .npz, or an original run directory.")
_ORIGINAL_CONFIG = flags.DEFINE_string(
    "original_config", None, "Official config file (configs/maepp_*.py of the original project).")
_ORIGINAL_ARGS = flags.DEFINE_string("original_args", None,
                                     "JSON file of the original builder's keyword arguments.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config naming the model.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write the workdir into.")


def main(argv):
  del argv
  if not _WEIGHTS.value or not _OUTPUT_DIR.value:
    raise UserError("--weights and --output_dir are required")
  given = [_CONFIG.value, _ORIGINAL_ARGS.value, _ORIGINAL_CONFIG.value]
  if sum(v is not None for v in given) > 1:
    raise UserError("pass at most one of --config, --original_args, --original_config")
  original_args = _ORIGINAL_ARGS.value
  if _ORIGINAL_CONFIG.value:
    original_args = original_io.read_config_file(_ORIGINAL_CONFIG.value)
  config = original.import_to_workdir(_WEIGHTS.value, _OUTPUT_DIR.value, config=_CONFIG.value,
                                      original_args=original_args)
  model = resolve_model_config(config.model)
  print(f"wrote {_OUTPUT_DIR.value} (model size {model.size}, width {model.width}, depth "
        f"{model.depth}); restore it with audiomaepp.hear_api.load_model")


if __name__ == "__main__":
  cli.run(main)
