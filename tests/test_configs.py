"""Experiment configs: they resolve to the original's models, bad model configs fail clearly."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from audiomaepp import checkpointing
from audiomaepp import experiment
from audiomaepp import models
from audiomaepp import original
from audiomaepp.tools import summary
from conftest import experiment_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))

# docs/reference.md#sizes-and-parameter-counts: encoder (width, depth, heads), decoder (width,
# depth, heads), blocks.
EXPECTED = {
    "tiny": ((192, 12, 3), (384, 4, 8), "plusplus"),
    "base": ((768, 12, 12), (384, 4, 8), "plusplus"),
    "large": ((1024, 24, 16), (512, 4, 8), "plusplus"),
    "large_dec384": ((1024, 24, 16), (384, 4, 8), "plusplus"),
    "large_dec768": ((1024, 24, 16), (768, 4, 8), "plusplus"),
    "mae_tiny": ((192, 12, 3), (384, 4, 8), "vit"),
    "mae_base": ((768, 12, 12), (384, 4, 8), "vit"),
}
# Parameter counts of the original (docs/reference.md#sizes-and-parameter-counts): total,
# trainable, encoder.
PARAMETER_COUNTS = {
    "tiny": (21_003_776, 20_859_200, 8_921_856),
    "base": (154_303_424, 154_014_272, 141_855_744),
    "large": (525_961_040, 525_575_504, 503_992_256),
    "mae_base": (None, 92_525_632, 85_106_688),
}


def _model(name):
  return experiment_config(name).model


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_resolves(name):
  config = models.resolve_model_config(_model(name))
  assert config.grid == (50, 5) and config.num_patches == 250 and config.num_keep == 50
  assert config.patch_dim == 64
  if name in EXPECTED:
    encoder, decoder, block = EXPECTED[name]
    assert (config.width, config.depth, config.num_heads) == encoder
    assert (config.decoder_width, config.decoder_depth, config.decoder_num_heads) == decoder
    assert config.encoder_block == config.decoder_block == block


def test_rope_ablations():
  enc_dec = models.resolve_model_config(_model("base_rope_enc_dec"))
  dec = models.resolve_model_config(_model("base_rope_dec"))
  assert (enc_dec.encoder_rope, enc_dec.decoder_rope) == ("sequence", "sequence")
  assert (dec.encoder_rope, dec.decoder_rope) == ("none", "sequence")


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_equal_the_original(name):
  total, trainable, encoder = PARAMETER_COUNTS[name]
  result = summary.summarize(_model(name))
  assert result["params_trainable"] == trainable
  assert result["params_encoder"] == encoder
  if total is not None:
    assert result["params_total"] == total


def test_base_flops_match_spec():
  # Base ≈ 20 GFLOP forward, ≈ 62 GFLOP per training sample
  # (docs/reference.md#sizes-and-parameter-counts).
  assert 19.5e9 < models.forward_flops_per_sample(_model("base")) < 21.5e9
  assert 60e9 < models.train_flops_per_sample(_model("base")) < 64e9


def test_model_section_is_derived_from_the_one_schema():
  fields = dataclasses.fields(models.ModelConfig)
  section = experiment.model_config()
  assert sorted(section) == sorted(f.name for f in fields)
  resolved = models.resolve_model_config(section)
  for f in fields:
    if f.default is not None:
      assert getattr(resolved, f.name) == f.default, f.name
  # The original builder's argument names come from the schema's metadata.
  args = original.original_args_from_config(section)
  assert args["embed_dim"] == 768 and args["decoder_embed_dim"] == 384
  assert args["img_size"] == [200, 80] and args["masking_mode"] == "unstructured"


@pytest.mark.integration
def test_no_top_level_configs_package_is_installed(tmp_path):
  """The package never imports the experiment files, and installs no `configs` package."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  probe = "import importlib.util, audiomaepp.train; print(importlib.util.find_spec('configs'))"
  done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "None"


@pytest.mark.integration
def test_config_files_load_beside_another_projects_configs_package(tmp_path):
  """A foreign `configs` package first on sys.path (the original repository has one) is harmless."""
  foreign = tmp_path / "configs"
  foreign.mkdir()
  (foreign / "__init__.py").write_text("")
  (foreign / "common.py").write_text("raise ImportError('the wrong configs package')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
  probe = ("import sys; from audiomaepp import experiment; "
           "print(experiment.load_config(sys.argv[1]).model.size)")
  done = subprocess.run([sys.executable, "-c", probe, str(REPO / "configs" / "tiny.py")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "tiny"


@pytest.mark.integration
def test_summary_cli_json():
  result = subprocess.run(
      [sys.executable, "-m", "audiomaepp.tools.summary", "--config=configs/tiny.py", "--json"],
      cwd=REPO, capture_output=True, text=True, check=True, timeout=300)
  record = json.loads(result.stdout)
  assert record["params_total"] == 21_003_776
  assert record["params_trainable"] == 20_859_200
  assert record["params_encoder"] == 8_921_856
  assert record["flops_per_sample"] == models.train_flops_per_sample(_model("tiny"))


@pytest.mark.parametrize("field, value, match", [
    ("size", "gigantic", "config.model.size"),
    ("patch_size", (3, 16), "config.model.patch_size"),
    ("input_shape", (200, 81), "config.model.patch_size"),
    ("mask_ratio", 0.0, "config.model.mask_ratio"),
    ("mask_ratio", 1.0, "config.model.mask_ratio"),
    ("num_heads", 5, "config.model.num_heads"),
    ("decoder_num_heads", 7, "config.model.decoder_num_heads"),
    ("encoder_block", "resnet", "config.model.encoder_block"),
    ("decoder_rope", "alibi", "config.model.decoder_rope"),
    ("mask_mode", "random", "config.model.mask_mode"),
    ("frame_layout", "freq_major", "config.model.frame_layout"),
    ("swiglu_norm", "none", "config.model.swiglu_norm"),
    ("dtype", "float64", "config.model.dtype"),
    ("attention_impl", "flash", "config.model.attention_impl"),
])
def test_invalid_model_config_names_the_field(field, value, match):
  config = experiment.model_config("tiny")
  config[field] = value
  with pytest.raises(ValueError, match=match):
    models.build_model(config)


def test_cudnn_attention_needs_half_precision():
  with pytest.raises(ValueError, match="config.model.attention_impl='cudnn'"):
    models.resolve_model_config({"size": "tiny", "attention_impl": "cudnn"})
  models.resolve_model_config({"size": "tiny", "attention_impl": "cudnn", "dtype": "bfloat16"})


def test_unknown_field_is_rejected():
  with pytest.raises(ValueError, match="unknown fields \\['widht'\\]"):
    models.resolve_model_config({"size": "tiny", "widht": 256})


def test_explicit_width_overrides_size():
  config = models.resolve_model_config({"size": "tiny", "width": 96, "num_heads": 4})
  assert (config.width, config.depth, config.num_heads) == (96, 12, 4)


def test_config_round_trips_through_the_workdir_record(tmp_path):
  config = experiment_config("large")
  checkpointing.save_config(str(tmp_path), config)
  restored = checkpointing.load_config(str(tmp_path))
  assert (models.resolve_model_config(restored.model)
          == models.resolve_model_config(config.model))


def test_finetune_recipes_take_the_pretraining_configs_models():
  """Fine-tuning configs name the model of the pretraining config whose checkpoints they load."""
  configs = REPO / "configs"
  demo = experiment.load_config(configs / "demo.py")
  assert experiment.load_config(configs / "finetune_demo.py").model == demo.model
  for arg, block in (("study", "plusplus"), ("study_vit", "vit")):
    study = experiment.load_config(configs / "study.py", block)
    assert experiment.load_config(configs / "finetune_small.py", arg).model == study.model
  with pytest.raises(ValueError, match="expected one of tiny, base, large, demo, study, study_vit"):
    experiment.load_config(configs / "finetune_small.py", "huge")
