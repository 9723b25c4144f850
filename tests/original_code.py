"""Original-format files made with the original PyTorch code (../shared/original); optional.

`original_models()` skips the calling test when torch or the original code's dependencies
(einops, rotary-embedding-torch) are missing, so the suite runs cleanly without them.
"""
import argparse
import pathlib
import sys

import ml_collections
import pytest

from conftest import ORIGINAL_CODE


def original_models():
  """The original package's `models` module (builders and `MAE_PlusPlus`); skips the calling
  test when the code or its dependencies are absent."""
  if not (ORIGINAL_CODE / "audiomaepp_original").is_dir():
    pytest.skip(f"the original PyTorch code {ORIGINAL_CODE} is absent (no ../shared beside the "
                "checkout)")
  for module in ("torch", "einops", "rotary_embedding_torch"):
    pytest.importorskip(module)
  if str(ORIGINAL_CODE) not in sys.path:
    sys.path.insert(0, str(ORIGINAL_CODE))
  import audiomaepp_original.models as models  # pylint: disable=g-import-not-at-top
  return models


def official_config(arch: str, model_args: dict) -> ml_collections.ConfigDict:
  """A config shaped like the official configs/maepp_*.py `get_config()`."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  config.model.arch = arch
  config.model.type = "mae"
  config.model.num_classes = 1000
  config.model.model_args = model_args
  config.model.patch_embed_args = ml_collections.ConfigDict()
  config.opt = ml_collections.ConfigDict({"optimizer": "Adamw", "learning_rate": 1.5e-4})
  config.batch_size = 128
  return config


def perturbed(model, seed: int = 0):
  """`model` with N(0, 0.05) noise on every weight (norms and tokens become non-trivial), as the
  fixtures were made; the fixed sin-cos tables are left alone."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if parameter.requires_grad and "pos_embed" not in name:
        parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
  return model.eval()


def save_trainer_checkpoint(model, path: pathlib.Path, config, epoch: int = 0, dtype=None):
  """What the original trainer's `misc.save_model` writes: model, optimizer, epoch, scaler and
  the argparse `args` whose `config` is the experiment ConfigDict."""
  import torch  # pylint: disable=g-import-not-at-top
  state = model.state_dict()
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  args = argparse.Namespace(config=config, workdir=str(path.parent.parent),
                            output_dir=str(path.parent), seed=0, precision="float32")
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": epoch,
              "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
