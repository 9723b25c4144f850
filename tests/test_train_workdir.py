"""Training refuses bad inputs in one line before anything is restored or written: a dataset
without the eval split, a workdir that is a file or read-only, and a restart with another model.

The workdirs are built by hand (config.json and checkpoint step folders), so nothing compiles.
"""
import os
import pathlib
import shutil
import tempfile

import pytest

from audiomaepp import checkpointing
from audiomaepp import models
from audiomaepp import train
from audiomaepp.data import builders
from audiomaepp.errors import UserError
from audiomaepp.train import pretrain
from audiomaepp.train import runner
from audiomaepp.train import workdir as workdir_lib
from conftest import experiment_config
import faults

NOBODY = 65534


@pytest.fixture(scope="module")
def root():
  """A directory every user may read (the read-only test runs as an unprivileged user)."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="audiomaepp_workdir_test_"))
  path.chmod(0o755)
  yield path
  shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(root):
  """A TFDS dataset of four 2.5 s tones, all in 'train' (eval_fraction 0): no eval split."""
  return faults.write_tone_shards(root)


@pytest.fixture
def config(data_dir):
  """The demo config, shrunk, on the dataset without eval split and without evaluation."""
  c = experiment_config("demo")
  c.data.source, c.data.data_dir = "tfds", str(data_dir)
  c.model.width, c.model.num_heads, c.model.depth = 64, 4, 1
  c.batch_size, c.eval_batches = 4, 0
  return c


def _workdir_with_checkpoint(path: pathlib.Path, config) -> pathlib.Path:
  """A workdir as a run of `config` leaves it: config.json and a checkpoint step (not readable:
  only its folder matters before the restore)."""
  checkpointing.save_config(str(path), config)
  (path / checkpointing.CHECKPOINT_DIR / "6").mkdir(parents=True)
  (path / checkpointing.CHECKPOINT_DIR / "6" / "junk").write_bytes(b"not a checkpoint")
  return path


def _snapshot(path: pathlib.Path) -> dict:
  return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_dataset_without_eval_split_fails_at_validation(config, data_dir):
  config.eval_batches = 3
  with pytest.raises(train.ConfigError) as error:
    train.validate_config(config)
  assert str(error.value) == (
      f"config.data.eval_split='eval': split 'eval' not in "
      f"{builders.dataset_dir(str(data_dir))}; it has ['train']; set --config.eval_batches=0 to train without evaluation")
  config.eval_batches = 0  # training without evaluation needs no eval split
  assert train.validate_config(config).width == 64


def test_workdir_that_is_a_file_is_refused(config, tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("notes")
  with pytest.raises(train.ConfigError, match=f"--workdir={workdir} is a file; expected a "
                                              "directory"):
    train.run(config, str(workdir))
  assert workdir.read_text() == "notes"


def test_read_only_workdir_is_refused(config, root):
  workdir = root / "read_only"
  workdir.mkdir()
  workdir.chmod(0o555)
  privileged = os.geteuid() == 0
  if privileged:  # root writes anywhere: check as an unprivileged user
    os.seteuid(NOBODY)
  try:
    with pytest.raises(train.ConfigError) as error:
      train.run(config, str(workdir))
  finally:
    if privileged:
      os.seteuid(0)
  assert str(error.value).startswith(f"--workdir={workdir} is not writable (Permission denied)")
  assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("changes,named", [
    ({"width": 128}, ["width=128 (recorded 64)"]),
    # Same parameter shapes, another architecture: must not resume silently.
    ({"num_heads": 8}, ["num_heads=8 (recorded 4)"]),
    ({"width": 128, "num_heads": 8}, ["width=128 (recorded 64)", "num_heads=8 (recorded 4)"]),
])
def test_restart_with_another_model_is_refused_before_anything_is_written(config, tmp_path,
                                                                          changes, named):
  workdir = _workdir_with_checkpoint(tmp_path / "w", config)
  before = _snapshot(workdir)
  for field, value in changes.items():
    config.model[field] = value
  with pytest.raises(train.ConfigError) as error:
    train.run(config, str(workdir))
  message = str(error.value)
  assert message.startswith(f"config.model differs from the model the checkpoints in {workdir} "
                            f"were trained with: {', '.join(named)};")
  assert "\n" not in message
  assert _snapshot(workdir) == before  # config.json not rewritten, nothing added or moved


def test_restart_accepts_other_fields(config, tmp_path):
  """Fields outside the model section, and how the model is computed (remat), may change."""
  workdir = _workdir_with_checkpoint(tmp_path / "w", config)
  config.num_train_steps, config.model.remat = 99, "full"
  config.model.size, config.model.width = "tiny", 64  # same resolved numbers: the same model
  check = lambda: workdir_lib.check_same_model(str(workdir), models.resolve_model_config(config.model))
  assert check() is None  # accepted
  config.model.mask_ratio = 0.5  # a field of the model itself: refused
  with pytest.raises(train.ConfigError, match=r"mask_ratio=0.5 \(recorded 0.8\)"):
    check()


def test_config_is_recorded_only_once_the_run_is_accepted(config, tmp_path):
  """A restart whose checkpoints cannot be restored fails without rewriting config.json."""
  workdir = _workdir_with_checkpoint(tmp_path / "w", config)
  recorded = (workdir / checkpointing.CONFIG_FILE).read_bytes()
  config.num_train_steps = 99
  with pytest.raises(UserError, match="no checkpoint under .* can be restored"):
    train.run(config, str(workdir))
  assert (workdir / checkpointing.CONFIG_FILE).read_bytes() == recorded


def test_another_optimiser_structure_names_the_fields(config, tmp_path, monkeypatch):
  """Checkpoints whose optimiser state has another structure (grad clipping switched on) are a
  config error naming the field, not damage to skip."""
  workdir = _workdir_with_checkpoint(tmp_path / "w", config)
  before = _snapshot(workdir)

  def mismatch(*args, **kwargs):
    raise checkpointing.StructureMismatchError("checkpoint step 6: tree structures do not match")

  monkeypatch.setattr(checkpointing, "restore_with_fallback", mismatch)
  config.grad_clip_norm = 1.0
  with pytest.raises(train.ConfigError) as error:
    train.run(config, str(workdir))
  assert str(error.value) == (
      f"the optimiser state in the checkpoints of {workdir} has another structure than this "
      "config's: config.grad_clip_norm=1.0 (recorded 0.0); resume with the recorded values, or "
      "use a new workdir")
  assert _snapshot(workdir) == before


def test_cleanup_never_replaces_the_error_that_ended_the_run(caplog):
  calls = []

  def failing(name):
    def close():
      calls.append(name)
      raise OSError(28, "No space left on device")
    return close

  closers = [failing("writer"), lambda: calls.append("checkpointer"), failing("plot")]
  runner.close_all(closers, ending_error=RuntimeError("the checkpoint error"))  # raises nothing
  assert calls == ["writer", "checkpointer", "plot"]
  assert len([r for r in caplog.records if "failed too" in r.getMessage()]) == 2
  calls.clear()
  with pytest.raises(OSError):  # without an error in flight, a failed close is the error
    runner.close_all(closers, ending_error=None)
  assert calls == ["writer", "checkpointer", "plot"]


def test_a_loss_curve_that_cannot_be_drawn_is_a_warning(monkeypatch, tmp_path, caplog):
  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(runner.visualize, "plot_loss_curve_from_workdir", full_disk)
  runner.plot_loss_curve(str(tmp_path))
  assert "the loss curve could not be drawn" in caplog.text


def test_a_bug_while_preparing_the_data_keeps_its_traceback(config, tmp_path, monkeypatch):
  """Only a UserError is a config error: any other ValueError (a bug in NumPy, librosa or here)
  propagates as itself, with its traceback."""
  def broken(data_config):
    raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

  monkeypatch.setattr(pretrain.pipeline, "ensure_dataset", broken)
  with pytest.raises(ValueError, match="operands could not be broadcast") as error:
    train.run(config, str(tmp_path / "w"))
  assert not isinstance(error.value, train.ConfigError)
