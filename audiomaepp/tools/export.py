"""Exports a checkpoint's encoder-decoder weights for the original PyTorch code or any framework.

    python -m audiomaepp.tools.export --checkpoint=WORKDIR --output=model.pth
    python -m audiomaepp.tools.export --checkpoint=WORKDIR --step=2000 \
        --format=safetensors --output=model.safetensors

--checkpoint is a pretraining workdir or an imported original; its newest intact checkpoint (or
--step) is written under the original project's state-dict names and layouts:
--format=original a `.pth` that the original's builders load with `strict=True`
(`mae_plusplus_<size>(**model_args).load_state_dict(checkpoint['model'])`, as its `hear_api`
does; needs PyTorch), --format=safetensors the same names and arrays for any framework (no
PyTorch needed). Both record the builder (`arch`, `model_args`), so
`audiomaepp.tools.import_original --weights=FILE` reads them back without further flags. The
format follows from the suffix of --output when not given. Non-finite weights are refused.
"""
import os

from absl import flags

from audiomaepp import hear_api
from audiomaepp import original
from audiomaepp import original_io
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or imported-original directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_FORMAT = flags.DEFINE_enum("format", None, list(original_io.FORMATS),
                            "'original' (.pth, needs PyTorch) or 'safetensors'; default: from "
                            "the suffix of --output.")
_OUTPUT = flags.DEFINE_string("output", None, "File to write (.pth, .pt or .safetensors).")


def _file_format(output: str) -> str:
  """--format, or the format the suffix of `output` names."""
  if _FORMAT.value:
    return _FORMAT.value
  for name, suffixes in original_io.FORMATS.items():
    if output.endswith(suffixes):
      return name
  raise UserError(f"--output={output}: pass --format ({' or '.join(original_io.FORMATS)}); the "
                  "suffix names neither (.pth, .pt, .safetensors)")


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise UserError("--checkpoint and --output are required")
  output = _OUTPUT.value
  file_format = _file_format(output)
  if os.path.exists(output):
    raise UserError(f"--output={output} already exists; choose another file or remove it")
  model = hear_api.load_model(_CHECKPOINT.value, step=_STEP.value)
  arch, model_args = original.builder(model.module.config)
  state = original.export_state_dict(model.params, model.module.config)
  original_io.write_checkpoint(output, state, arch, model_args, file_format)
  print(f"wrote {output} ({file_format}: {len(state)} tensors, "
        f"{sum(v.size for v in state.values()):,} values); the original's builder: {arch}")


if __name__ == "__main__":
  cli.run(main)
