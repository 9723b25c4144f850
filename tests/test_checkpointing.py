"""Workdir config record and params-only checkpoints round-trip."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiomaepp import checkpointing
from conftest import experiment_config


def test_params_round_trip_latest_step(tmp_path):
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4)}, "bias": jnp.ones(3)}
  checkpointing.save_params(str(tmp_path), params, step=0)
  later = jax.tree.map(lambda x: x + 1, params)
  checkpointing.save_params(str(tmp_path), later, step=7)
  restored = checkpointing.restore_params(str(tmp_path), jax.eval_shape(lambda: params))
  np.testing.assert_array_equal(restored["dense"]["kernel"], later["dense"]["kernel"])
  first = checkpointing.restore_params(str(tmp_path), jax.eval_shape(lambda: params), step=0)
  np.testing.assert_array_equal(first["bias"], params["bias"])


def test_config_record_round_trip(tmp_path):
  config = experiment_config("tiny")
  config.model.decoder_width = 256
  checkpointing.save_config(str(tmp_path), config)
  loaded = checkpointing.load_config(str(tmp_path))
  assert loaded.model.decoder_width == 256
  assert loaded.model.size == "tiny"
  assert list(loaded.model.patch_size) == [4, 16]


def test_missing_workdir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a workdir"):
    checkpointing.load_config(str(tmp_path / "nowhere"))


class _RaisesOnDelete:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_restores_drop_only_the_closed_event_loop_noise_and_restore_the_hook(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  previous = sys.unraisablehook
  other = ValueError("a real problem")
  with pytest.raises(KeyError):
    with checkpointing._quiet_failed_reads():  # pylint: disable=protected-access
      _RaisesOnDelete(RuntimeError("Event loop is closed"))  # deleted at once: unraisable
      _RaisesOnDelete(other)
      raise KeyError("the restore's own error")
  assert seen == [other]
  assert sys.unraisablehook is previous
