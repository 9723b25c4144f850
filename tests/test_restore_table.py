"""Restore semantics row by row (docs/reliability.md, "Restore semantics"), for both restores:
`restore_with_fallback` (training) and `restore_params` (fine-tuning's `init_from`, the HEAR API,
embed, export, evaluate). Damage is real (files deleted or truncated, metadata overwritten);
statuses of storage and of bugs come from a patched `CheckpointManager.restore`."""
import errno
import glob
import os
import pathlib
import re
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from audiomaepp import checkpointing
from audiomaepp import errors


def _params(step, width=4):
  return {"dense": {"kernel": jnp.arange(3.0 * width).reshape(3, width) * step,
                    "bias": jnp.ones(width) * step}}


def _step_of(params):
  """The step whose `_params` these are."""
  return int(params["dense"]["bias"][0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with training checkpoints of steps 2 and 4 (params and train state)."""
  workdir = tmp_path_factory.mktemp("saved")
  with checkpointing.training_manager(str(workdir), keep=5) as manager:
    for step in (2, 4):
      checkpointing.save_train_state(manager, step, _params(step), {"step": jnp.int32(step)})
    manager.wait_until_finished()
  return workdir


@pytest.fixture
def workdir(saved, tmp_path):
  shutil.copytree(saved, tmp_path / "w")
  return tmp_path / "w"


def _with_fallback(workdir, like=None):
  """`restore_with_fallback` as training calls it; the step of the parameters it restored."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  with checkpointing.training_manager(str(workdir), keep=5) as manager:
    restored = checkpointing.restore_with_fallback(
        manager, abstract(like or _params(0)), abstract({"step": jnp.int32(0)}))
  assert int(restored.train_state["step"]) == restored.step == _step_of(restored.params)
  return restored.step


def _params_only(workdir, like=None):
  """`restore_params` as the HEAR API calls it; the step of the parameters it restored."""
  return _step_of(checkpointing.restore_params(
      str(workdir), jax.eval_shape(lambda: like or _params(0))))


RESTORES = pytest.mark.parametrize("restore", [_with_fallback, _params_only],
                                   ids=["restore_with_fallback", "restore_params"])


def _layout(workdir):
  """The steps under checkpoints/ and under checkpoints_skipped/."""
  skipped = workdir / checkpointing.SKIPPED_DIR
  return (sorted(os.listdir(workdir / checkpointing.CHECKPOINT_DIR)),
          sorted(os.listdir(skipped)) if skipped.exists() else [])


UNTOUCHED = (["2", "4"], [])


def _fail_reads(monkeypatch, error, times=99, step=4):
  """Reads of `step` raise `error`, the first `times` of them; returns the list of steps read."""
  original, calls = ocp.CheckpointManager.restore, []

  def restore(self, read_step, *args, **kwargs):
    calls.append(read_step)
    if read_step == step and calls.count(step) <= times:
      raise error
    return original(self, read_step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  monkeypatch.setattr(checkpointing, "READ_BACKOFF_SECONDS", 0.01)
  return calls


def _array_files(step_dir):
  files = [f for f in glob.glob(str(step_dir / "params" / "d" / "*")) if os.path.isfile(f)]
  assert files
  return files


def _truncate_array_files(step_dir):
  for f in _array_files(step_dir):
    os.truncate(f, os.path.getsize(f) // 3)


def _delete_array_files(step_dir):
  for f in _array_files(step_dir):
    os.remove(f)


def _truncate_manifest(step_dir):
  manifest = step_dir / "params" / "manifest.ocdbt"
  os.truncate(manifest, manifest.stat().st_size // 2)


def _corrupt_metadata(step_dir):
  (step_dir / "params" / "_METADATA").write_text('{"tree_metadata": {')


def _delete_item(step_dir):
  shutil.rmtree(step_dir / "params")


# Real damage, and the start of the reason TensorStore or Orbax gives for it.
DAMAGE = pytest.mark.parametrize("damage, reason", [
    (_truncate_array_files, "ValueError: OUT_OF_RANGE: "),
    (_delete_array_files, "ValueError: NOT_FOUND: "),
    (_truncate_manifest, "ValueError: DATA_LOSS: "),
    (_corrupt_metadata, "JSONDecodeError: "),
    (_delete_item, "KeyError: 'Item \"params\" was not found in the checkpoint"),
], ids=lambda x: getattr(x, "__name__", "")[1:] or None)


@RESTORES
@DAMAGE
def test_damage_is_skipped(workdir, restore, damage, reason, caplog):
  damage(workdir / "checkpoints" / "4")
  with caplog.at_level("WARNING"):
    assert restore(workdir) == 2
  assert f"checkpoint step 4 {'' if restore is _with_fallback else f'of {workdir} '}cannot be " \
         f"restored" in caplog.text
  assert f"({reason}" in caplog.text
  # Training moves the damaged step out of the way of its next save; reading moves nothing.
  assert _layout(workdir) == ((["2"], ["4"]) if restore is _with_fallback else UNTOUCHED)


@RESTORES
def test_an_incomplete_step_is_skipped(workdir, restore, monkeypatch):
  _fail_reads(monkeypatch, ValueError(f"Found incomplete checkpoint at {workdir}/checkpoints/4."))
  assert restore(workdir) == 2
  assert _layout(workdir) == ((["2"], ["4"]) if restore is _with_fallback else UNTOUCHED)


@RESTORES
def test_no_step_left_is_one_line_naming_each_step(workdir, restore):
  for step in ("2", "4"):
    _truncate_array_files(workdir / "checkpoints" / step)
  with pytest.raises(checkpointing.NoRestorableCheckpointError) as error:
    restore(workdir)
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert str(workdir) in message and "\n" not in message
  assert "(step 4: ValueError: OUT_OF_RANGE" in message and "; step 2: ValueError: " in message
  assert _layout(workdir) == UNTOUCHED


TRANSIENT = [
    ValueError("UNAVAILABLE: Error reading gs://b/w/checkpoints/4: connection reset"),
    ValueError("DEADLINE_EXCEEDED: Error reading gs://b/w/checkpoints/4"),
    ValueError("RESOURCE_EXHAUSTED: rate limit"),
    ValueError("ABORTED: concurrent update"),
    OSError(errno.EIO, "Input/output error"),
    TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]


@RESTORES
@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: str(e).split(":")[0])
def test_storage_that_answers_again_is_read_again(workdir, restore, error, monkeypatch):
  calls = _fail_reads(monkeypatch, error, times=2)
  assert restore(workdir) == 4 and calls == [4, 4, 4]
  assert _layout(workdir) == UNTOUCHED


@RESTORES
@pytest.mark.parametrize("error", TRANSIENT[::4], ids=lambda e: str(e).split(":")[0])
def test_storage_that_never_answers_is_one_line_and_moves_nothing(workdir, restore, error,
                                                                 monkeypatch):
  calls = _fail_reads(monkeypatch, error)
  with pytest.raises(errors.StorageError,
                     match=rf"^checkpoint step 4 \S+ {re.escape(str(workdir))}\S* could not be "
                           rf"read after 4 "
                           rf"attempts \({type(error).__name__}: "):
    restore(workdir)
  assert calls == [4] * checkpointing.READ_ATTEMPTS  # never fell back to step 2
  assert _layout(workdir) == UNTOUCHED


@RESTORES
@pytest.mark.parametrize("error", [
    ValueError("PERMISSION_DENIED: Error reading gs://b/w/checkpoints/4: 403"),
    ValueError("UNAUTHENTICATED: no credentials"),
    PermissionError(errno.EACCES, "Permission denied", "w/checkpoints/4/params"),
], ids=["PERMISSION_DENIED", "UNAUTHENTICATED", "PermissionError"])
def test_a_refused_read_is_one_line_naming_the_path_without_retry(workdir, restore, error,
                                                                 monkeypatch):
  calls = _fail_reads(monkeypatch, error)
  with pytest.raises(checkpointing.CheckpointPermissionError,
                     match=rf"^checkpoint step 4 \S+ {re.escape(str(workdir))}\S* could not be "
                           rf"read: permission denied \({type(error).__name__}: "):
    restore(workdir)
  assert calls == [4]
  assert _layout(workdir) == UNTOUCHED


@RESTORES
@pytest.mark.parametrize("like, differs", [
    (_params(0, width=5), r"Requested shape: \(3?,? ?5,?\) is not compatible with the stored "
                          r"shape: \(3?,? ?4,?\)(;|$)"),
    ({"dense": {**_params(0)["dense"], "scale": jnp.ones(4)}},
     r"tree structures do not match: dense.scale(;|$)"),
], ids=["another_width", "another_layer"])
def test_another_structure_is_one_line_not_damage(workdir, restore, like, differs):
  with pytest.raises(checkpointing.StructureMismatchError, match=differs) as error:
    restore(workdir, like)
  message = str(error.value)
  assert isinstance(error.value, errors.UserError) and "\n" not in message
  assert message.startswith("checkpoint step 4 ") and str(workdir) in message
  if restore is _params_only:  # training names the config fields instead
    assert message.endswith(f"check that the model asked for is the one recorded in "
                            f"{workdir / checkpointing.CONFIG_FILE}")
  assert _layout(workdir) == UNTOUCHED


BUGS = {
    "INTERNAL": ValueError("INTERNAL: unexpected state in the OCDBT cache"),
    "UNKNOWN": ValueError("UNKNOWN: error in the storage client"),
    # TensorStore drops the status of INVALID_ARGUMENT; other gRPC clients keep it.
    "INVALID_ARGUMENT": ValueError("Error parsing object member \"driver\""),
    "INVALID_ARGUMENT_prefixed": ValueError("INVALID_ARGUMENT: bad spec"),
    "FAILED_PRECONDITION": ValueError("FAILED_PRECONDITION: Generation mismatch"),
    "CANCELLED": ValueError("CANCELLED: the read was cancelled"),
    "KeyError": KeyError("params"),
    "AttributeError": AttributeError("'NoneType' object has no attribute 'shape'"),
    "TypeError": TypeError("unsupported operand type(s)"),
}


@RESTORES
@pytest.mark.parametrize("error", BUGS.values(), ids=BUGS.keys())
def test_a_bug_keeps_its_own_exception_and_moves_nothing(workdir, restore, error, monkeypatch):
  calls = _fail_reads(monkeypatch, error)
  with pytest.raises(type(error)) as raised:
    restore(workdir)
  assert raised.value is error  # its own traceback, not one line, not a later TypeError
  assert calls == [4]
  assert _layout(workdir) == UNTOUCHED


@RESTORES
def test_bytes_that_do_not_decode_are_not_taken_for_damage(workdir, restore):
  """Bytes overwritten in place: TensorStore reports INVALID_ARGUMENT (no status prefix), which
  says nothing certain about the step, so it is not skipped."""
  for f in map(pathlib.Path, _array_files(workdir / "checkpoints" / "4")):
    data = f.read_bytes()
    half = len(data) // 2
    f.write_bytes(data[:half] + bytes(b ^ 0xFF for b in data[half:]))
  with pytest.raises(ValueError, match="Data corruption detected") as raised:
    restore(workdir)
  assert not isinstance(raised.value, errors.UserError)
  assert _layout(workdir) == UNTOUCHED


@RESTORES
def test_a_correct_restore_logs_no_warning(workdir, restore, caplog):
  with caplog.at_level("WARNING"):
    assert restore(workdir) == 4
  assert [r.getMessage() for r in caplog.records] == []


def test_a_damaged_read_still_warns_and_only_the_notice_is_dropped(workdir, caplog):
  filters = list(logging.get_absl_logger().filters)
  _truncate_array_files(workdir / "checkpoints" / "4")
  with caplog.at_level("WARNING"):
    assert _params_only(workdir) == 2
    logging.warning("Given directory is read only=%s", "elsewhere")  # not while making a reader
  assert [r.getMessage() for r in caplog.records] == [
      f"checkpoint step 4 of {workdir} cannot be restored ({caplog.records[0].args[2]})",
      f"restored step 2 of {workdir} instead of the damaged newer steps [4]",
      "Given directory is read only=elsewhere"]
  assert caplog.records[0].args[2].startswith("ValueError: OUT_OF_RANGE: ")
  assert logging.get_absl_logger().filters == filters


def test_a_named_step_that_is_damaged_is_not_replaced_by_another(workdir):
  _truncate_array_files(workdir / "checkpoints" / "4")
  with pytest.raises(checkpointing.NoRestorableCheckpointError,
                     match=rf"^no checkpoint of {re.escape(str(workdir))} can be restored "
                           r"\(step 4: "):
    checkpointing.restore_params(str(workdir), jax.eval_shape(lambda: _params(0)), step=4)
  assert _step_of(checkpointing.restore_params(str(workdir), jax.eval_shape(lambda: _params(0)),
                                               step=2)) == 2
