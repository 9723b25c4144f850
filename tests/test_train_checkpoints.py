"""Training checkpoints: params + train state, fallback past damaged steps, failed writes that
leave the previous step restorable."""
import errno
import glob
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from audiomaepp import checkpointing
from audiomaepp import errors
from audiomaepp import models
from audiomaepp.train import checkpointer as checkpointer_lib
from audiomaepp.train import state as state_lib
from audiomaepp.train import workdir as workdir_lib


def _params(step):
  return {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) * step, "bias": jnp.ones(4) * step}}


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _save_steps(workdir, steps, keep=5):
  with checkpointing.training_manager(workdir, keep=keep) as manager:
    for step in steps:
      checkpointing.save_train_state(manager, step, _params(step), {"step": jnp.int32(step)})
    manager.wait_until_finished()


def _restore(workdir, rest=None):
  with checkpointing.training_manager(workdir, keep=5) as manager:
    return checkpointing.restore_with_fallback(
        manager, _abstract(_params(0)), _abstract(rest or {"step": jnp.int32(0)}))


def test_round_trip(tmp_path):
  _save_steps(str(tmp_path), [2, 4])
  restored = _restore(str(tmp_path))
  assert restored.step == 4 and not restored.skipped
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], _params(4)["dense"]["kernel"])
  assert int(restored.train_state["step"]) == 4
  # The `params` item alone still loads (what embedding tools read).
  params = checkpointing.restore_params(str(tmp_path), jax.eval_shape(lambda: _params(0)))
  np.testing.assert_array_equal(params["dense"]["bias"], _params(4)["dense"]["bias"])


def test_checkpoints_with_a_saved_iterator_still_restore(tmp_path):
  """Checkpoints written before the data position was derived from the step hold a `data_iter`
  item (the Grain iterator state); resuming reads the other items and ignores it."""
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(iterator)
  with checkpointing.training_manager(str(tmp_path), keep=2) as manager:
    manager.save(3, args=ocp.args.Composite(
        params=ocp.args.StandardSave(_params(3)),
        train_state=ocp.args.StandardSave({"step": jnp.int32(3)}),
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  assert os.path.isdir(tmp_path / "checkpoints" / "3" / "data_iter")
  restored = _restore(str(tmp_path))
  assert restored.step == 3 and not restored.skipped
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], _params(3)["dense"]["kernel"])


def test_no_checkpoint_restores_nothing(tmp_path):
  assert _restore(str(tmp_path)) is None


def _truncate_data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as handle:
      handle.truncate(os.path.getsize(f) // 3)


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_item"])
def test_damaged_latest_step_falls_back_and_says_why(tmp_path, damage, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4, 6])
  step_dir = os.path.join(workdir, "checkpoints", "6")
  if damage == "truncate_arrays":
    _truncate_data_files(step_dir)
  else:
    for f in glob.glob(os.path.join(step_dir, "train_state", "**"), recursive=True)[::-1]:
      os.remove(f) if os.path.isfile(f) else os.rmdir(f)
  with caplog.at_level("WARNING"):
    restored = _restore(workdir)
  assert restored.step == 4
  assert [s for s, _ in restored.skipped] == [6]
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], _params(4)["dense"]["kernel"])
  assert "checkpoint step 6 cannot be restored" in caplog.text
  # The damaged step is kept for inspection, out of the way of the next save of step 6.
  assert os.path.isdir(os.path.join(workdir, checkpointing.SKIPPED_DIR, "6"))
  assert not os.path.exists(step_dir)


def test_all_steps_damaged_is_an_error(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [1, 2])
  for step in (1, 2):
    _truncate_data_files(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(checkpointing.NoRestorableCheckpointError,
                     match=r"^no checkpoint under \S+ can be restored \(step 2: ValueError: "
                           r"OUT_OF_RANGE: .*; step 1: .*\); move the directory away") as error:
    _restore(workdir)
  assert isinstance(error.value, errors.UserError)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]  # nothing moved


@pytest.mark.parametrize("keep", [1, 2])
def test_failed_write_is_reported_and_previous_step_stays(tmp_path, monkeypatch, keep):
  """A write error (here ENOSPC injected into the array writes) fails that save only."""
  workdir = str(tmp_path)
  checkpointer = checkpointer_lib.Checkpointer(workdir, keep=keep)
  state = state_lib.TrainState(step=jnp.int32(3), params=_params(3),
                                opt_state={"count": jnp.int32(7)})
  assert checkpointer.save(3, state) is None
  assert checkpointer.wait() is None

  class DiskFull:  # an Orbax commit future whose write fails in the background
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, "No space left on device")

  save = ocp.StandardCheckpointHandler.async_save

  async def disk_full(self, *args, **kwargs):
    return [*(await save(self, *args, **kwargs) or []), DiskFull()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
  later = state.replace(step=jnp.int32(5), params=_params(5))
  error = checkpointer.save(5, later) or checkpointer.wait()
  assert "checkpoint save at step 5 failed" in error and "No space left" in error
  assert "latest complete checkpoint: 3" in error
  checkpointer.close()
  monkeypatch.undo()
  leftovers = [p for p in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in p]
  assert not leftovers  # partial files of the failed save are removed
  with checkpointing.training_manager(workdir, keep=keep) as manager:
    restored = checkpointing.restore_with_fallback(
        manager, _abstract(_params(0)), _abstract(state.checkpoint_items()[1]))
  assert restored.step == 3 and int(restored.train_state["opt_state"]["count"]) == 7
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], _params(3)["dense"]["kernel"])


def test_next_start_removes_partial_saves_before_returning(tmp_path):
  """What in-flight writes of a failed or killed save left is gone once the manager exists."""
  workdir = str(tmp_path)
  checkpointer = checkpointer_lib.Checkpointer(workdir, keep=2)
  state = state_lib.TrainState(step=jnp.int32(3), params=_params(3),
                                opt_state={"count": jnp.int32(7)})
  assert checkpointer.save(3, state) is None
  checkpointer.close()
  partial = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp" / "params"
  partial.mkdir(parents=True)
  (partial / "chunk").write_bytes(b"half")
  checkpointing.training_manager(workdir, keep=2).close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


@pytest.mark.parametrize("error, cause", [
    # TensorStore names the OS error only by its code, at the end of a long line.
    (ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"params/d/0\" "
                + "x" * 600 + " [os_error_code='27']"), "File too large"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/params"), "No space left on device"),
    (RuntimeError("write failed [os_error_code=28]"), "No space left on device"),
])
def test_failed_write_message_names_the_os_cause_first(error, cause):
  message = checkpointer_lib.describe_error(error)
  assert message.startswith(f"{type(error).__name__}: ")
  assert message.count(cause) == 1 and message.index(cause) < 60, message
  assert len(message) < 500


def test_failed_write_message_without_an_os_cause_is_the_first_line():
  assert checkpointer_lib.describe_error(KeyError("params")) == "KeyError: 'params'"


def test_resuming_with_the_other_block_layout_fails_in_one_line(tmp_path):
  from conftest import experiment_config  # pylint: disable=g-import-not-at-top
  config = experiment_config("demo")
  config.model.scan_layers = False
  checkpointing.save_config(str(tmp_path), config)
  os.makedirs(tmp_path / checkpointing.CHECKPOINT_DIR / "4")
  config.model.scan_layers = True
  with pytest.raises(workdir_lib.ConfigError, match=r"hold per-block layers: resume with "
                     r"--config.model.scan_layers=False, or use a new workdir$"):
    workdir_lib.check_same_model(str(tmp_path), models.resolve_model_config(config.model))
  config.model.scan_layers = False
  workdir_lib.check_same_model(str(tmp_path), models.resolve_model_config(config.model))


def test_another_optimiser_structure_is_an_error_not_damage(tmp_path):
  """A train state saved with one optimiser (adamw) restored as another (clipping + adamw):
  not damage, so no step is skipped or moved."""
  import optax  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  with checkpointing.training_manager(workdir, keep=5) as manager:
    for step in (2, 4):
      checkpointing.save_train_state(manager, step, _params(step),
                                     {"opt": optax.adamw(1e-3).init(_params(step))})
    manager.wait_until_finished()
  clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  with pytest.raises(checkpointing.StructureMismatchError, match="step 4 .*do not match"):
    _restore(workdir, rest={"opt": clipped.init(_params(0))})
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert not os.path.exists(os.path.join(workdir, checkpointing.SKIPPED_DIR))


@pytest.mark.parametrize("error,outcome", [
    # Damaged: only another step can help.
    (ValueError("OUT_OF_RANGE: Error reading byte range"), checkpointing.DAMAGED),
    (ValueError("DATA_LOSS: Error decoding manifest"), checkpointing.DAMAGED),
    (ValueError("NOT_FOUND: Error reading local file params/d/0"), checkpointing.DAMAGED),
    (KeyError('Item "train_state" was not found in the checkpoint.'), checkpointing.DAMAGED),
    (FileNotFoundError("_CHECKPOINT_METADATA"), checkpointing.DAMAGED),
    (json.JSONDecodeError("Expecting value", "{", 1), checkpointing.DAMAGED),
    (ValueError("Found incomplete checkpoint at gs://b/w/checkpoints/6."), checkpointing.DAMAGED),
    # Storage that did not answer: read again.
    (ValueError("UNAVAILABLE: connection reset"), checkpointing.UNREADABLE),
    (ValueError("DEADLINE_EXCEEDED: GCS"), checkpointing.UNREADABLE),
    (ValueError("RESOURCE_EXHAUSTED: rate limit"), checkpointing.UNREADABLE),
    (ValueError("ABORTED: concurrent update"), checkpointing.UNREADABLE),
    (OSError(errno.EIO, "Input/output error"), checkpointing.UNREADABLE),
    (TimeoutError(), checkpointing.UNREADABLE),
    (ConnectionResetError(), checkpointing.UNREADABLE),
    # Refused.
    (ValueError("PERMISSION_DENIED: 403"), checkpointing.DENIED),
    (ValueError("UNAUTHENTICATED: no credentials"), checkpointing.DENIED),
    (PermissionError(errno.EACCES, "Permission denied"), checkpointing.DENIED),
    # Another structure.
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not "
                "match:\ndense.w:"), checkpointing.MISMATCH),
    (ValueError("Requested shape: (4, 4) is not compatible with the stored shape: (3, 4)."),
     checkpointing.MISMATCH),
    # Anything else says nothing about the step.
    (ValueError("INTERNAL: unexpected state"), checkpointing.BUG),
    (ValueError("UNKNOWN: error"), checkpointing.BUG),
    (ValueError("INVALID_ARGUMENT: bad spec"), checkpointing.BUG),
    (ValueError("Error decoding b-tree node: Data corruption detected"), checkpointing.BUG),
    (ValueError("FAILED_PRECONDITION: Generation mismatch"), checkpointing.BUG),
    (ValueError("CANCELLED: cancelled"), checkpointing.BUG),
    (ValueError("operands could not be broadcast"), checkpointing.BUG),
    (KeyError("params"), checkpointing.BUG),
    (AttributeError("'NoneType' object has no attribute 'shape'"), checkpointing.BUG),
    (RuntimeError("Event loop is closed"), checkpointing.BUG),
])
def test_restore_errors_are_classified(error, outcome):
  """The rows of docs/reliability.md "Restore semantics"; what each outcome does, for both
  restores: tests/test_restore_table.py."""
  assert checkpointing.classify_restore_error(error) == outcome
