"""Workdirs given as gs:// URLs: every file of the workdir goes through etils.epath (and Orbax),
never os.path. GCS is stood in for by fsspec's local filesystem registered for the `gs`
protocol, so the URL code path runs here; Orbax's own I/O runs on a local path."""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from audiomaepp import checkpointing
from audiomaepp import metrics
from audiomaepp import visualize
from conftest import experiment_config


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/PATH lands in tmp_path/BUCKET/PATH; returns tmp_path."""
  root = str(tmp_path / "gcs")

  class LocalGCS(LocalFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, finalize_on_close=True, **kwargs):
      del finalize_on_close
      super().__init__(**kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          return f"{root}/{path[len(prefix):]}".rstrip("/")
      return super()._strip_protocol(path)

  registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is a read-only view
  monkeypatch.setitem(registry._registry, "gcs", LocalGCS)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)  # so that a path mistaken for a local one would show up here
  yield tmp_path / "gcs"
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_gs_workdir_config_metrics_pictures_and_steps(fake_gcs, tmp_path):
  workdir = "gs://bucket/runs/base"
  config = experiment_config("demo")
  path = checkpointing.save_config(workdir, config)
  assert str(path) == "gs://bucket/runs/base/config.json"
  on_disk = json.loads((fake_gcs / "bucket/runs/base/config.json").read_text())
  assert on_disk["batch_size"] == config.batch_size
  assert checkpointing.load_config(workdir).model.width == config.model.width

  jsonl = checkpointing.workdir_path(workdir) / metrics.METRICS_FILE
  for step in (1, 2, 3):
    metrics._append_line(jsonl, json.dumps({"step": step, "split": "train", "loss": 1.0 / step})
                         + "\n")
  metrics._truncate_jsonl(jsonl, 2)  # what a writer resuming from step 2 does
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/{metrics.METRICS_FILE}")] == [1, 2]

  image = visualize.plot_loss_curve_from_workdir(workdir, f"{workdir}/loss_curve.png")
  assert image.ndim == 3
  png = fake_gcs / "bucket/runs/base/loss_curve.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # On GCS Orbax marks a complete step with commit_success.txt, not by a rename.
  steps = fake_gcs / "bucket/runs/base" / checkpointing.CHECKPOINT_DIR
  for step, complete in ((3, True), (6, False)):
    (steps / str(step)).mkdir(parents=True)
    if complete:
      (steps / str(step) / "commit_success.txt").write_text("")
  assert checkpointing.latest_complete_step(workdir) == 3
  assert sorted(os.listdir(tmp_path)) == ["gcs"]  # nothing written to a local "gs:" directory


def test_latest_complete_step_on_a_local_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert checkpointing.latest_complete_step("run") is None
  params = {"w": jnp.arange(4.0)}
  with checkpointing.training_manager("run", keep=3, async_save=False) as manager:
    for step in (2, 4):
      checkpointing.save_train_state(manager, step, params, {"step": jnp.asarray(step)})
    manager.wait_until_finished()
  # A save killed midway: Orbax's temporary directory, never a complete step.
  (tmp_path / "run/checkpoints/6.orbax-checkpoint-tmp-1234").mkdir()
  assert checkpointing.latest_complete_step("run") == 4
  assert checkpointing.latest_complete_step(str(tmp_path / "run")) == 4
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = checkpointing.restore_params("run", abstract)
  np.testing.assert_array_equal(restored["w"], params["w"])
