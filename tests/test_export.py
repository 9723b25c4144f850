"""Export of checkpoints for the original PyTorch code (.pth) and any framework (.safetensors)."""
import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from audiomaepp import checkpointing
from audiomaepp import errors
from audiomaepp import experiment
from audiomaepp import hear_api
from audiomaepp import models
from audiomaepp import original
from audiomaepp import original_io
from audiomaepp.errors import UserError
import micro_models
import original_code
from conftest import experiment_config

TOLERANCE = 1e-4


def _perturbed_params(model_config, seed=0):
  """Freshly initialised params with N(0, 0.05) noise on every leaf (norms, biases and tokens
  non-trivial), independent of the fixtures (a fresh copy of each fixture model's, cached)."""
  key = json.dumps(model_config.to_dict(), sort_keys=True, default=str)
  return jax.tree.map(np.copy, _perturbed_params_cached(key, seed))


@functools.lru_cache(maxsize=None)
def _perturbed_params_cached(model_json, seed):
  module = models.build_model(json.loads(model_json))
  params = models.unbox(module.init({"params": jax.random.key(seed), "masking": jax.random.key(1)},
                                    np.zeros((1, *module.config.input_shape), np.float32)))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [np.asarray(leaf + 0.05 * jax.random.normal(k, leaf.shape))
                                   for leaf, k in zip(leaves, keys)])


def _micro_model_config(fixtures_dir, name="maepp_micro"):
  return original.model_config_from_args(fixtures_dir / f"{name}_config.json")


def _workdir(path, model_config, params, step=0):
  config = experiment.base_config()
  config.model = model_config
  checkpointing.save_params(str(path), params, step=step)
  checkpointing.save_config(str(path), config)
  return path


def _export(workdir, output, file_format, step=None):
  model = hear_api.load_model(str(workdir), step=step)
  arch, model_args = original.builder(model.module.config)
  state = original.export_state_dict(model.params, model.module.config)
  original_io.write_checkpoint(output, state, arch, model_args, file_format)
  return model


def _original_frames(torch_model, x):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return torch_model.forward_features(torch.from_numpy(x)).numpy()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["maepp_micro", "maepp_micro_rope", "mae_micro_vanilla"])
def test_pth_loads_strictly_in_the_original_and_matches_encode(fixtures_dir, tmp_path, name):
  """Our params -> .pth -> the original's MAE_PlusPlus(**model_args), load_state_dict(strict=True)
  -> forward_features equals our encode (original frame layout)."""
  original_models = original_code.original_models()  # skips without torch or the original code
  import torch  # pylint: disable=g-import-not-at-top
  model_config = _micro_model_config(fixtures_dir, name)
  workdir = _workdir(tmp_path / "run", model_config, _perturbed_params(model_config))
  model = _export(workdir, tmp_path / "model.pth", "original")

  checkpoint = torch.load(tmp_path / "model.pth", map_location="cpu", weights_only=True)
  assert checkpoint["arch"] == "MAE_PlusPlus"
  torch_model = getattr(original_models, checkpoint["arch"])(**checkpoint["model_args"])
  torch_model.load_state_dict(checkpoint["model"], strict=True)
  torch_model.eval()

  x = np.random.default_rng(0).standard_normal((2, 1, 200, 80)).astype(np.float32)
  _, encode = micro_models.functions(model.module.config)
  ours = np.asarray(encode({"params": model.params}, x, "original")["frames"])
  expected = _original_frames(torch_model, x)
  assert ours.shape == expected.shape
  error = float(np.max(np.abs(ours - expected)))
  print(f"{name}: forward_features vs encode max abs diff {error:.3g}")
  assert error <= TOLERANCE, f"{name}: forward_features vs encode max abs diff {error:.3g}"


@pytest.mark.integration
def test_tiny_pth_loads_in_the_original_builder(tmp_path):
  """A Tiny of configs/tiny.py exports as `mae_plusplus_tiny` with the paper's decoder, which the
  original's builder makes and loads strictly; its features match ours."""
  original_models = original_code.original_models()
  import torch  # pylint: disable=g-import-not-at-top
  model_config = experiment_config("tiny").model
  workdir = _workdir(tmp_path / "run", model_config, _perturbed_params(model_config))
  model = _export(workdir, tmp_path / "tiny.pth", "original")
  checkpoint = torch.load(tmp_path / "tiny.pth", map_location="cpu", weights_only=True)
  assert checkpoint["arch"] == "mae_plusplus_tiny"
  assert "embed_dim" not in checkpoint["model_args"]
  torch_model = original_models.mae_plusplus_tiny(**checkpoint["model_args"])
  torch_model.load_state_dict(checkpoint["model"], strict=True)
  torch_model.eval()
  x = np.random.default_rng(1).standard_normal((1, 1, 200, 80)).astype(np.float32)
  _, encode = micro_models.functions(model.module.config)
  ours = np.asarray(encode({"params": model.params}, x, "original")["frames"])
  error = float(np.max(np.abs(ours - _original_frames(torch_model, x))))
  print(f"tiny: forward_features vs encode max abs diff {error:.3g}")
  assert error <= TOLERANCE, f"tiny: forward_features vs encode max abs diff {error:.3g}"


def test_safetensors_has_the_original_names_and_arrays(fixtures_dir, tmp_path):
  """safetensors.numpy reads every key of the original state dict with the original's arrays
  (the fixture's own weights, so the reference is the original's file, not our converter)."""
  model_config, variables = original.load(fixtures_dir / "maepp_micro_weights.npz",
                                          fixtures_dir / "maepp_micro_config.json")
  workdir = _workdir(tmp_path / "run", model_config, variables["params"])
  _export(workdir, tmp_path / "model.safetensors", "safetensors")

  loaded = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  reference = np.load(fixtures_dir / "maepp_micro_weights.npz")
  assert set(loaded) == set(reference.files)
  for key in reference.files:
    assert loaded[key].dtype == np.float32
    np.testing.assert_allclose(loaded[key], reference[key], atol=1e-6, err_msg=key)
  with safetensors.safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    metadata = f.metadata()
  arguments = json.loads(metadata["model_args"])
  with open(fixtures_dir / "maepp_micro_config.json") as f:
    fixture_args = json.load(f)
  assert metadata["arch"] == "MAE_PlusPlus"
  for key in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "img_size", "patch_size", "encoder_plusplus_block"):
    assert arguments[key] == fixture_args[key], key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_then_import_is_bit_identical(fixtures_dir, tmp_path, suffix):
  if suffix == ".pth":
    pytest.importorskip("torch")
  model_config = _micro_model_config(fixtures_dir, "maepp_micro_rope")
  params = _perturbed_params(model_config)
  workdir = _workdir(tmp_path / "run", model_config, params, step=7)
  exported = tmp_path / f"model{suffix}"
  _export(workdir, exported, "original" if suffix == ".pth" else "safetensors")
  # No model flags: the file records its builder.
  original.import_to_workdir(str(exported), str(tmp_path / "back"))
  restored = hear_api.load_model(str(tmp_path / "back")).params
  before = hear_api.load_model(str(workdir)).params
  flat_before = jax.tree_util.tree_leaves_with_path(before)
  flat_after = dict(jax.tree_util.tree_leaves_with_path(restored))
  assert len(flat_before) == len(flat_after)
  for path, value in flat_before:
    np.testing.assert_array_equal(np.asarray(flat_after[path]), np.asarray(value),
                                  err_msg=jax.tree_util.keystr(path))


def test_non_finite_weights_are_refused(fixtures_dir):
  model_config = _micro_model_config(fixtures_dir)
  params = _perturbed_params(model_config)
  params["cls_token"] = np.full_like(params["cls_token"], np.nan)
  params["encoder"]["norm"]["scale"] = np.full_like(params["encoder"]["norm"]["scale"], np.inf)
  with pytest.raises(UserError, match=r"non-finite weights .* \['cls_token', "
                                      r"'encoder.encoder_norm.weight'\]; refusing") as raised:
    original.export_state_dict(params, model_config)
  assert "\n" not in str(raised.value)


def test_models_the_original_cannot_build_are_refused(fixtures_dir):
  model_config = _micro_model_config(fixtures_dir)
  model_config.encoder_rope = "patch_2d"
  with pytest.raises(UserError, match=r"encoder_rope='patch_2d' has no equivalent"):
    original.builder(model_config)


def test_pth_without_torch_names_the_install_command(fixtures_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  model_config = _micro_model_config(fixtures_dir)
  state = original.export_state_dict(_perturbed_params(model_config), model_config)
  with pytest.raises(errors.MissingDependency, match=r"pip install -e '\.\[torch\]'") as raised:
    original_io.write_checkpoint(tmp_path / "m.pth", state, "MAE_PlusPlus", {}, "original")
  assert isinstance(raised.value, ImportError) and isinstance(raised.value, UserError)
  assert not list(tmp_path.iterdir())


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "audiomaepp.tools.export", *args],
                        capture_output=True, text=True)


@pytest.mark.integration
def test_export_cli(fixtures_dir, tmp_path):
  model_config = _micro_model_config(fixtures_dir)
  params = _perturbed_params(model_config)
  workdir = _workdir(tmp_path / "run", model_config, params, step=3)
  bad = jax.tree.map(lambda leaf: leaf, params)
  bad["decoder"]["pred"]["bias"] = np.full_like(bad["decoder"]["pred"]["bias"], np.nan)
  checkpointing.save_params(str(workdir), bad, step=5)

  out = tmp_path / "model.safetensors"
  done = _cli(f"--checkpoint={workdir}", f"--output={out}")  # the newest step holds a NaN
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "error: non-finite weights (NaN or inf) in ['decoder.decoder_pred.bias']; refusing to "
      "export them")
  assert not out.exists()

  done = _cli(f"--checkpoint={workdir}", "--step=3", f"--output={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"wrote {out} (safetensors: " in done.stdout
  np.testing.assert_array_equal(safetensors.numpy.load_file(out)["cls_token"], params["cls_token"])

  for flags, message in (
      ([f"--checkpoint={workdir}", "--step=3", f"--output={out}"], "already exists"),
      ([f"--checkpoint={workdir}", f"--output={tmp_path / 'model.bin'}"],
       "the suffix names no file format (.pth, .pt, .safetensors); pass --format=native for a "
       "model folder"),
      ([f"--checkpoint={workdir}", "--step=4", f"--output={tmp_path / 'x.safetensors'}"],
       "has no checkpoint step 4"),
      ([f"--output={out}"], "--checkpoint and --output are required")):
    done = _cli(*flags)
    assert done.returncode == 1, flags
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, (flags, done.stderr[-2000:])
