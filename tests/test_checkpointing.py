"""Workdir config record and params-only checkpoints round-trip."""
import asyncio
import gc
import logging
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


def _orphaned_future(message):
  """A future whose exception nobody retrieves, dropped at once: asyncio logs it when collected."""
  loop = asyncio.new_event_loop()
  loop.create_future().set_exception(ValueError(message))
  loop.close()


def test_restores_drop_the_unretrieved_errors_of_sibling_reads_and_nothing_else(caplog):
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    with checkpointing._quiet_failed_reads():  # pylint: disable=protected-access
      _orphaned_future("OUT_OF_RANGE: a sibling read of the failed one")
    _orphaned_future("outside any restore")
    gc.collect()
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and logged[0].startswith("Future exception was never retrieved")
  assert "outside any restore" in caplog.text and "sibling read" not in caplog.text
  assert not any(f.__class__.__name__ == "function" and f.__name__ == "unretrieved"
                 for f in logging.getLogger("asyncio").filters)  # the filter is removed


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
