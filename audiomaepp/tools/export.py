"""Exports a checkpoint's encoder-decoder weights: as a model folder for anyone, or for the
original PyTorch code.

    python -m audiomaepp.tools.export --checkpoint=WORKDIR --format=native --output=DIR
    python -m audiomaepp.tools.export --checkpoint=WORKDIR --output=model.pth
    python -m audiomaepp.tools.export --checkpoint=WORKDIR --step=2000 \
        --format=safetensors --output=model.safetensors

--checkpoint is a pretraining workdir or an imported original; its newest intact checkpoint (or
--step) is exported. --format=native writes the folder DIR (`audiomaepp.native_io`) for any model:
config.json (the resolved model section), model.safetensors (the parameters under this project's
names) and README.md (a model card from the run: model, data, step, final train loss, how to load
it); `hear_api.load_model(DIR)`, `tools.embed --checkpoint=DIR` and fine-tuning's
`--config.init_from=DIR` read it. Its step is --step or the newest complete one, recorded in the
card: a damaged one is refused rather than replaced by an older one.

The original project's formats hold only models the original can build (no 2-D rotary
positions), under its state-dict names and layouts: --format=original a `.pth` that its builders
load with `strict=True` (`mae_plusplus_<size>(**model_args).load_state_dict(checkpoint['model'])`,
as its `hear_api` does; needs PyTorch), --format=safetensors the same names and arrays for any
framework (no PyTorch needed). Both record the builder (`arch`, `model_args`), so
`audiomaepp.tools.import_original --weights=FILE` reads them back without further flags. Their
format follows from the suffix of --output when not given. Non-finite weights are refused.
"""
import os

from absl import flags

from audiomaepp import hear_api
from audiomaepp import native_io
from audiomaepp import original
from audiomaepp import original_io
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

NATIVE = "native"
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or imported-original directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_FORMAT = flags.DEFINE_enum("format", None, [NATIVE, *original_io.FORMATS],
                            "'native' (a model folder, any model), 'original' (.pth, needs "
                            "PyTorch) or 'safetensors' (the original's names); default: from the "
                            "suffix of --output.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Folder (--format=native) or file (.pth, .pt or .safetensors) to "
                              "write.")


def _file_format(output: str) -> str:
  """--format, or the format the suffix of `output` names."""
  if _FORMAT.value:
    return _FORMAT.value
  for name, suffixes in original_io.FORMATS.items():
    if output.endswith(suffixes):
      return name
  raise UserError(f"--output={output}: the suffix names no file format (.pth, .pt, "
                  f".safetensors); pass --format={NATIVE} for a model folder, or --format "
                  f"({' or '.join(original_io.FORMATS)}) for the original's formats")


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise UserError("--checkpoint and --output are required")
  output = _OUTPUT.value
  file_format = _file_format(output)
  if os.path.exists(output):
    raise UserError(f"--output={output} already exists; choose another "
                    f"{'folder' if file_format == NATIVE else 'file'} or remove it")
  if file_format == NATIVE:
    native_io.export(_CHECKPOINT.value, output, step=_STEP.value)
    print(f"wrote {output} ({native_io.CONFIG_FILE}, {native_io.MODEL_FILE}, "
          f"{native_io.CARD_FILE}); read it with audiomaepp.hear_api.load_model")
    return
  model = hear_api.load_model(_CHECKPOINT.value, step=_STEP.value)
  try:
    arch, model_args = original.builder(model.module.config)
  except UserError as e:
    raise UserError(f"{e}; --format={NATIVE} exports any model") from None
  state = original.export_state_dict(model.params, model.module.config)
  original_io.write_checkpoint(output, state, arch, model_args, file_format)
  print(f"wrote {output} ({file_format}: {len(state)} tensors, "
        f"{sum(v.size for v in state.values()):,} values); the original's builder: {arch}")


if __name__ == "__main__":
  cli.run(main)
