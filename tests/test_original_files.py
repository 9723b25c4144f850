"""The original project's files: trainer checkpoints, run directories, config files, bad input."""
import importlib.util
import json
import logging
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from audiomaepp import checkpointing
from audiomaepp import models
from audiomaepp import original
from audiomaepp import original_io
from audiomaepp.errors import UserError
import micro_models
import original_code
from conftest import experiment_config

DATA = pathlib.Path(__file__).parent / "data"
NANO_RUN = DATA / "original_nano"
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="reading .pth files needs torch")

# An official config file as the original project writes them (its package's .common is absent).
OFFICIAL_CONFIG = '''import ml_collections
from .common import get_opt_config, get_data_config


def get_config():
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.arch = "mae_plusplus_tiny"
    config.model.type = "mae"
    config.model.model_args = {
        "mask_ratio": 0.8,
        "img_size": (200, 80),
        "patch_size": (4, 16),
        "decoder_num_heads": 8,
        "decoder_depth": 4,
        "decoder_embed_dim": 384,
        "encoder_plusplus_block": True,
        "decoder_plusplus_block": True,
        "encoder_use_swiglu_final_ffn": True,
        "decoder_use_swiglu_final_ffn": True,
        "encoder_use_rope": False,
        "decoder_use_rope": False
    }
    config.opt = get_opt_config()
    return config
'''
TINY_MODEL_ARGS = {  # the model_args above
    "mask_ratio": 0.8, "img_size": (200, 80), "patch_size": (4, 16), "decoder_num_heads": 8,
    "decoder_depth": 4, "decoder_embed_dim": 384, "encoder_plusplus_block": True,
    "decoder_plusplus_block": True, "encoder_use_swiglu_final_ffn": True,
    "decoder_use_swiglu_final_ffn": True, "encoder_use_rope": False, "decoder_use_rope": False}


def _micro_state(fixtures_dir):
  return dict(np.load(fixtures_dir / "maepp_micro_weights.npz"))


def _micro_args(fixtures_dir):
  return json.loads((fixtures_dir / "maepp_micro_config.json").read_text())


def test_official_config_file_reads_without_the_original_code(tmp_path):
  path = tmp_path / "maepp_tiny_200_16x4.py"
  path.write_text(OFFICIAL_CONFIG)
  model = original.model_config_from_args(original_io.read_config_file(path))
  assert models.resolve_model_config(model) == models.resolve_model_config(
      experiment_config("tiny").model)


def test_config_model_args_with_arch_give_the_builder_sizes():
  """The config's model_args alone name no size: the error says how to give it; with the
  builder name they resolve to tiny, the builder's own default decoder heads (6) applying."""
  with pytest.raises(UserError, match=r"\['embed_dim', 'depth', 'num_heads'\] missing.*arch"):
    original.model_config_from_args(TINY_MODEL_ARGS)
  model = original.model_config_from_args({**TINY_MODEL_ARGS, "arch": "mae_plusplus_tiny"})
  assert models.resolve_model_config(model) == models.resolve_model_config(
      experiment_config("tiny").model)
  defaults = {k: v for k, v in TINY_MODEL_ARGS.items() if k != "decoder_num_heads"}
  vanilla = original.model_config_from_args(
      {**defaults, "arch": "mae_base", "encoder_plusplus_block": False,
       "decoder_plusplus_block": False, "encoder_use_swiglu_final_ffn": False,
       "decoder_use_swiglu_final_ffn": False})
  resolved = models.resolve_model_config(vanilla)
  assert (resolved.width, resolved.encoder_block, resolved.decoder_num_heads) == (768, "vit", 6)
  with pytest.raises(UserError, match="mae_plusplus_gigantic.*not an original builder"):
    original.model_config_from_args({"arch": "mae_plusplus_gigantic"})


def test_run_directory_uses_the_highest_epoch(tmp_path, caplog):
  folder = tmp_path / "run" / "checkpoints"
  folder.mkdir(parents=True)
  for epoch in (2, 10, 9):
    (folder / f"checkpoint-{epoch}.pth").write_bytes(b"")
  with caplog.at_level(logging.WARNING, logger="absl"):
    assert original_io.newest_checkpoint(tmp_path / "run").name == "checkpoint-10.pth"
  assert "checkpoint-10.pth (epoch 10 of 3 found)" in caplog.text
  with pytest.raises(UserError, match="no checkpoints/checkpoint-<epoch>.pth"):
    original_io.newest_checkpoint(tmp_path)


def test_containers_and_ddp_prefix_are_unwrapped(fixtures_dir, caplog):
  state, args = _micro_state(fixtures_dir), _micro_args(fixtures_dir)
  _, expected = original.load(state, args)
  ddp = {f"module.{k}": v for k, v in state.items()}
  for weights in ({"state_dict": state}, {"model": state, "epoch": 3}, {"model": ddp}):
    with caplog.at_level(logging.WARNING, logger="absl"):
      _, variables = original.load(weights, args)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
  assert "stripped the DistributedDataParallel prefix 'module.' from all" in caplog.text


def _junk(path):
  path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  return path


def test_bad_checkpoints_get_one_clear_line(fixtures_dir, tmp_path):
  state, args = _micro_state(fixtures_dir), _micro_args(fixtures_dir)
  nan = {k: v.copy() for k, v in state.items()}
  nan["encoder.blocks.1.attn.qkv_layer.weight"].flat[7] = np.nan
  cases = [
      (nan, r"non-finite weights \(NaN or inf\) in \['encoder.blocks.1.attn.qkv_layer.weight'\]"),
      ({"model": {"a": "text"}}, "'a' is a str, not a tensor"),
      ({}, "the state dict is empty"),
      (tmp_path / "missing.pth", "no such file or directory"),
      (str(fixtures_dir / "maepp_micro_config.json"), "expected a .pth, .pt, .safetensors or .npz"),
      (str(_junk(tmp_path / "junk.safetensors")), "not a safetensors file"),
  ]
  for weights, match in cases:
    with pytest.raises(UserError, match=match) as error:
      original.load(weights, args)
    assert "\n" not in str(error.value)
  with pytest.raises(UserError, match="does not record its model; pass --original_config"):
    original.load(state)


def test_half_precision_tables_are_compared_within_their_rounding(fixtures_dir):
  """A float16 checkpoint's sin-cos tables differ from ours by float16 rounding (~2.4e-4):
  accepted; a real difference (0.01) is still refused."""
  state, args = _micro_state(fixtures_dir), _micro_args(fixtures_dir)
  half = {k: v.astype(np.float16) for k, v in state.items()}
  error = np.abs(half["encoder.pos_embed"].astype(np.float32) - state["encoder.pos_embed"]).max()
  assert 1e-5 < error < np.finfo(np.float16).eps
  _, variables = original.load(half, args)
  np.testing.assert_array_equal(variables["params"]["cls_token"],
                                half["cls_token"].astype(np.float32))
  half["encoder.pos_embed"] = half["encoder.pos_embed"] + np.float16(0.01)
  with pytest.raises(UserError, match="encoder.pos_embed differs"):
    original.load(half, args)


@needs_torch
def test_stored_float16_trainer_checkpoint_imports(tmp_path):
  """tests/data/original_nano: a float16 trainer checkpoint (optimizer, epoch, scaler, args
  with the config) made once with the original code; its saved args name the model."""
  config = original.import_to_workdir(str(NANO_RUN), str(tmp_path / "nano"))
  resolved = models.resolve_model_config(config.model)
  assert (resolved.width, resolved.depth, resolved.input_shape) == (16, 1, (8, 32))
  assert checkpointing.load_config(str(tmp_path / "nano")).model.width == 16
  import torch  # pylint: disable=g-import-not-at-top
  stored = torch.load(NANO_RUN / "checkpoints" / "checkpoint-2.pth", weights_only=False)["model"]
  _, variables = original.load(NANO_RUN)
  np.testing.assert_array_equal(variables["params"]["cls_token"], stored["cls_token"].float())
  with pytest.raises(UserError, match="differs from the one its saved args record.*depth 2 vs 1"):
    original.load(NANO_RUN, _nano_args(depth=2))


def _nano_args(**change):
  sys.path.insert(0, str(DATA))
  from make_original_nano import NANO_ARGS  # pylint: disable=g-import-not-at-top
  return {**NANO_ARGS, **change}


@needs_torch
def test_unreadable_pth_files(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  code = tmp_path / "code.pth"
  torch.save({"model": {"a": torch.zeros(1)}, "hook": print}, code)
  for path, match in ((empty, r"the file is empty \(0 bytes\)"),
                      (junk, "not a PyTorch checkpoint torch can read"),
                      (code, r"holds objects other than tensors.*builtins.print.*refusing")):
    with pytest.raises(UserError, match=match):
      original_io.read_checkpoint(path)


@pytest.mark.integration
@pytest.mark.slow
def test_trainer_checkpoint_of_the_original_code(fixtures_dir, tmp_path):
  """A run directory written as the original trainer does (checkpoint-<epoch>.pth with the
  argparse args and the experiment ConfigDict) imports through the CLI; our `encode` matches the
  original's `forward_features`."""
  original_models = original_code.original_models()  # skips without torch
  import torch  # pylint: disable=g-import-not-at-top
  args = {k: v for k, v in _micro_args(fixtures_dir).items() if k != "num_params_total"}
  torch.manual_seed(0)
  model = original_code.perturbed(original_models.MAE_PlusPlus(**args))
  config = original_code.official_config("MAE_PlusPlus", args)
  for epoch in (1, 12):
    original_code.save_trainer_checkpoint(
        model, tmp_path / "run" / "checkpoints" / f"checkpoint-{epoch}.pth", config, epoch)
  workdir = tmp_path / "imported"
  done = subprocess.run([sys.executable, "-m", "audiomaepp.tools.import_original",
                         f"--weights={tmp_path / 'run'}", f"--output_dir={workdir}"],
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "checkpoint-12.pth" in done.stderr
  restored = checkpointing.load_config(str(workdir))
  _, variables = original.load(tmp_path / "run")
  x = np.random.default_rng(0).standard_normal((2, 1, 200, 80)).astype(np.float32)
  with torch.no_grad():
    expected = model.forward_features(torch.from_numpy(x)).numpy()
  _, encode = micro_models.functions(models.resolve_model_config(restored.model))
  frames = np.asarray(encode(variables, x, "original")["frames"])
  assert frames.shape == expected.shape
  assert float(np.max(np.abs(frames - expected))) < 1e-4
