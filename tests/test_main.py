"""main.py and config validation: every bad config fails before compilation with one clear line."""
import os
import subprocess
import sys

import jax
import pytest

from audiomaepp import train
from conftest import experiment_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config(tmp_path):
  """The demo config pointed at an (empty) TFDS directory, so nothing gets built."""
  c = experiment_config("demo")
  c.data.source = "tfds"
  c.data.data_dir = str(tmp_path)
  return c


@pytest.mark.parametrize("field,value,message", [
    ("model.size", "gigantic", "config.model.size='gigantic'"),
    ("model.patch_size", (3, 16), "patch_size=(3, 16) does not divide"),
    ("model.mask_ratio", 1.0, "mask_ratio=1.0: expected a value in (0, 1)"),
    ("model.num_heads", 5, "num_heads=5 must be positive and divide"),
    ("batch_size", 0, "config.batch_size=0: expected a positive integer"),
    ("data.crop_frames", 100, "config.data.crop_frames=100 differs"),
    ("mesh.data", 3, "config.mesh"),
    ("profile_steps", "3,2", "config.profile_steps='3,2': expected 'a,b' with 1 <= a <= b"),
])
def test_bad_config_fields(config, field, value, message):
  if field == "model.size":
    config.model.width = None
  section, _, name = field.rpartition(".")
  target = config[section] if section else config
  target[name] = value
  with pytest.raises(train.ConfigError) as error:
    train.validate_config(config)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_batch_not_divisible_by_devices(config, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  config.batch_size = 12
  with pytest.raises(train.ConfigError, match="batch_size=12 is not divisible by the 8 devices"):
    train.validate_config(config)


def test_missing_data_dir_names_the_prepare_command(config):
  with pytest.raises(train.ConfigError, match="no built dataset .*prepare_dataset"):
    train.validate_config(config)
  config.data.data_dir = None
  with pytest.raises(train.ConfigError, match="data_dir is not set.*prepare_dataset"):
    train.validate_config(config)


@pytest.mark.integration
def test_base_config_without_data_fails_fast_with_one_line(tmp_path):
  """The CLI path: exit status 1, a single `error:` line on stderr, nothing compiled."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.data.data_dir is not set") and "prepare_dataset" in last
  assert "Compiling" not in proc.stderr
  assert "Traceback" not in proc.stderr


def test_base_config_is_the_paper_setup():
  c = experiment_config("base")
  assert (c.batch_size, c.num_epochs, c.warmup_epochs, c.b1, c.b2, c.weight_decay) == \
      (1024, 100, 10, 0.9, 0.95, 0.05)
  assert c.base_lr == 1.5e-4 and c.grad_clip_norm == 0.0 and c.min_lr == 0.0
