"""Parity with the original PyTorch implementation (fixtures) and original checkpoint import."""
import json
import logging
import sys

import jax
import numpy as np
import pytest

from audiomaepp import models
from audiomaepp import original
from audiomaepp.models import layers
from audiomaepp.models import layout
import micro_models
from conftest import experiment_config

FIXTURE_MODELS = ("maepp_micro", "maepp_micro_rope", "mae_micro_vanilla")
MANIFEST_CONFIGS = {
    "maepp_tiny_200_16x4": "tiny", "maepp_base_200_16x4": "base", "maepp_large_200_16x4": "large",
    "mae_base_200_16x4_vanilla": "mae_base",
}
TOLERANCE = 1e-4


def _fixture(fixtures_dir, name):
  weights = fixtures_dir / f"{name}_weights.npz"
  args = fixtures_dir / f"{name}_config.json"
  io = dict(np.load(fixtures_dir / f"{name}_io.npz"))
  return weights, args, io


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_matches_original_outputs(name, scan_layers):
  config, variables, io = micro_models.fixture_model(name, scan_layers)
  reconstruct, encode = micro_models.functions(config)
  out = jax.device_get(reconstruct(variables, io["x"], io["ids_keep"], io["ids_restore"]))
  encoded = jax.device_get(encode(variables, io["x"], "original"))
  norm_pix_target = models.patch_targets(io["x"], config.patch_size, norm_pix=True)
  outputs = dict(
      encoder_out=out["encoder_out"], pred=out["pred"], target=out["target"], mask=out["mask"],
      loss=out["loss"], loss_norm_pix=models.masked_mse(out["pred"], norm_pix_target, out["mask"]),
      encoder_tokens_unmasked=encoded["tokens"].reshape(2, 250, -1),
      features_original_layout=encoded["frames"])
  for key, value in outputs.items():
    assert value.shape == io[key].shape, key
    error = float(np.max(np.abs(value - io[key])))
    assert error <= TOLERANCE, f"{name}: {key} max abs error {error:.3g}"


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_parameter_total_matches_original(fixtures_dir, name):
  weights, args, _ = _fixture(fixtures_dir, name)
  expected = json.loads(args.read_text())["num_params_total"]
  assert models.parameter_counts(original.model_config_from_args(args))["total"] == expected
  assert sum(v.size for v in np.load(weights).values()) == expected


def test_sincos_tables_equal_the_original(fixtures_dir):
  weights = np.load(fixtures_dir / "maepp_micro_weights.npz")
  np.testing.assert_allclose(layers.sincos_2d_table(64, (50, 5)), weights["encoder.pos_embed"][0],
                             rtol=0, atol=1e-7)
  np.testing.assert_allclose(layers.sincos_1d_table(32, 250),
                             weights["decoder.decoder_pos_embed"][0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MANIFEST_CONFIGS))
def test_full_size_state_dict_manifest(fixtures_dir, name):
  manifest = json.loads((fixtures_dir / "original_state_dict_shapes.json").read_text())[name]
  model_config = experiment_config(MANIFEST_CONFIGS[name]).model
  expected = {k: tuple(v) for k, v in manifest.items()}
  assert original.state_dict_shapes(model_config) == expected


@pytest.mark.parametrize("module", ["tiny", "mae_base"])
def test_state_dict_names_cover_every_parameter_once(module):
  model_config = experiment_config(module).model
  model_config.scan_layers = False  # the names are per block, as in the original
  targets = [path for path, how in original.state_dict_names(model_config).values()
             if how != "fixed"]
  leaves = jax.tree_util.tree_leaves_with_path(models.param_shapes(model_config))
  params = [tuple(p.key for p in path) for path, _ in leaves]
  assert len(targets) == len(set(targets))
  assert sorted(targets) == sorted(params)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_state_dict_round_trip(fixtures_dir, scan_layers):
  weights, args, _ = _fixture(fixtures_dir, "maepp_micro_rope")
  model_config, variables = original.load(weights, args)
  model_config.scan_layers = scan_layers
  variables = {"params": layout.to_layout(variables["params"], scan_layers)}
  exported = original.to_state_dict(variables["params"], model_config)
  stored = np.load(weights)
  assert sorted(exported) == sorted(stored.files)
  for key in stored.files:
    np.testing.assert_allclose(exported[key], stored[key], atol=1e-6, err_msg=key)


def test_mismatches_are_all_listed(fixtures_dir):
  weights, args, _ = _fixture(fixtures_dir, "maepp_micro")
  state = dict(np.load(weights))
  del state["decoder.decoder_norm.bias"]
  state["encoder.blocks.9.norm1.weight"] = np.zeros(64, np.float32)
  state["cls_token"] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(ValueError) as error:
    original.load(state, args)
  message = str(error.value)
  assert "decoder.decoder_norm.bias" in message
  assert "encoder.blocks.9.norm1.weight" in message
  assert "cls_token: checkpoint (1, 1, 32), expected (1, 1, 64)" in message


def test_wrong_positional_table_is_rejected(fixtures_dir):
  weights, args, _ = _fixture(fixtures_dir, "maepp_micro")
  state = {"model": dict(np.load(weights))}
  state["model"]["encoder.pos_embed"] = state["model"]["encoder.pos_embed"] + 0.1
  with pytest.raises(ValueError, match="encoder.pos_embed differs"):
    original.load(state, args)


def test_norm3_is_reported(fixtures_dir, caplog):
  weights, args, _ = _fixture(fixtures_dir, "maepp_micro")
  with caplog.at_level(logging.INFO, logger="absl"):
    original.load(weights, args)
  assert any("norm3" in r.getMessage() and "unused" in r.getMessage() for r in caplog.records)


def test_pth_without_torch_fails_clearly(fixtures_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, installed or not
  path = tmp_path / "checkpoint.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="needs PyTorch"):
    original.load(path, fixtures_dir / "maepp_micro_config.json")


def test_original_args_of_tiny_give_the_tiny_config():
  args = dict(img_size=[200, 80], patch_size=[4, 16], in_chans=1, embed_dim=192, depth=12,
              num_heads=3, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=8,
              mlp_ratio=4, mask_ratio=0.8, use_cls_token=True, encoder_plusplus_block=True,
              decoder_plusplus_block=True, encoder_use_swiglu_final_ffn=True,
              decoder_use_swiglu_final_ffn=True, encoder_use_rope=False, decoder_use_rope=False)
  ours = models.resolve_model_config(original.model_config_from_args(args))
  assert ours == models.resolve_model_config(experiment_config("tiny").model)


@pytest.mark.parametrize("change, match", [
    (dict(frequency_first=True), "frequency_first"),
    (dict(encoder_use_swiglu_final_ffn=False), "encoder_use_swiglu_final_ffn"),
    (dict(decoder_depht=2), "unknown arguments"),
    (dict(num_heads=5), "num_heads"),
])
def test_unsupported_original_args(fixtures_dir, change, match):
  args = json.loads((fixtures_dir / "maepp_micro_config.json").read_text())
  with pytest.raises(ValueError, match=match):
    original.model_config_from_args({**args, **change})
