"""Writes tests/data/original_nano/: a float16 trainer checkpoint of a nano original model.

Run once from the repository root (needs torch, einops, rotary-embedding-torch and
../shared/original): `PYTHONPATH=$PWD:tests python tests/data/make_original_nano.py`.
"""
import pathlib

import torch

import original_code

NANO_ARGS = {"img_size": [8, 32], "patch_size": [4, 16], "embed_dim": 16, "depth": 1,
             "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
             "mask_ratio": 0.5, "encoder_plusplus_block": True, "decoder_plusplus_block": True,
             "encoder_use_swiglu_final_ffn": True, "decoder_use_swiglu_final_ffn": True}


def main():
  torch.manual_seed(0)
  models = original_code.original_models()
  model = original_code.perturbed(models.MAE_PlusPlus(**NANO_ARGS))
  config = original_code.official_config("MAE_PlusPlus", NANO_ARGS)
  out = pathlib.Path(__file__).parent / "original_nano" / "checkpoints" / "checkpoint-2.pth"
  original_code.save_trainer_checkpoint(model, out, config, epoch=2, dtype=torch.float16)


if __name__ == "__main__":
  main()
