"""Metrics: peak-FLOPs table, throughput/MFU/ETA, the JSONL and TensorBoard writers, pictures."""
import json
import math
import os
import struct
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from audiomaepp import metrics
from audiomaepp import visualize


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v4", 275e12),
                                       ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                       ("cpu", None)])
def test_peak_flops_table(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak


def test_peak_flops_override():
  assert metrics.peak_flops_per_device("cpu", override=1e11) == 1e11


def test_throughput_mfu_and_eta(monkeypatch):
  clock = iter([100.0, 110.0, 111.0, 112.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  tracker = metrics.Throughput(global_batch=64, flops_per_sample=3e9, peak_flops_total=8e12,
                               total_steps=1000, start_step=0)
  out = tracker.update(100)  # 100 steps of 64 in 10 s
  assert out["samples_per_sec"] == pytest.approx(640.0)
  assert out["mfu"] == pytest.approx(640.0 * 3e9 / 8e12)
  assert out["eta_s"] == pytest.approx(900 * 0.1)
  unknown = metrics.Throughput(global_batch=64, flops_per_sample=3e9, peak_flops_total=None,
                               total_steps=10, start_step=0)
  assert "mfu" not in unknown.update(5)


def _read_tensorboard_scalars(logdir):
  """Scalars of tfevents files, parsed from the TFRecord framing (no TensorFlow)."""
  values = {}
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          values.setdefault(value.tag, []).append((event.step, value.simple_value))
  return values


def test_writer_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 2.5, "lr": 1e-4, "grad_norm": 3.0})
  writer.write_scalars(2, {"loss": 2.0, "lr": 2e-4, "grad_norm": 2.0})
  writer.write_scalars(2, {"loss": 1.9}, split="eval")
  writer.write_scalars(3, {"loss": float("nan"), "lr": 3e-4, "grad_norm": float("inf")})
  writer.close()
  lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval"),
                                                        (3, "train")]
  assert all("loss" in r for r in records)
  assert records[1]["lr"] == pytest.approx(2e-4) and records[2]["loss"] == pytest.approx(1.9)
  assert records[3]["loss"] is None and records[3]["nonfinite"]  # JSON has no NaN
  scalars = _read_tensorboard_scalars(str(tmp_path / metrics.TENSORBOARD_DIR))
  assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
  assert scalars["eval/loss"] == [(2, pytest.approx(1.9))]


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in range(1, 7)]
  path.write_text("\n".join(lines) + '\n{"step": 7, "spl')  # killed mid-write
  writer = metrics.MetricsWriter(str(tmp_path), start_step=4)
  writer.write_scalars(5, {"loss": 0.5})
  writer.close()
  steps = [r["step"] for r in metrics.read_jsonl(str(path))]
  assert steps == [1, 2, 3, 4, 5]


def test_reconstruction_picture(tmp_path):
  rng = np.random.default_rng(0)
  spectrogram = rng.normal(size=(200, 80)).astype(np.float32)
  pixel_mask = np.zeros((200, 80), np.float32)
  pixel_mask[40:120] = 1.0
  path = str(tmp_path / "recon.png")
  image = visualize.plot_reconstruction(spectrogram, pixel_mask, spectrogram * 0.5, path, "t")
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  saved = matplotlib.image.imread(path)
  assert saved.shape[:2] == image.shape[:2]
  assert image.std() > 10  # not a blank canvas


def test_loss_curve_picture(tmp_path):
  records = [{"step": s, "split": "train", "loss": math.exp(-s / 10)} for s in range(1, 50)]
  records += [{"step": 25, "split": "eval", "loss": 0.1}, {"step": 30, "split": "train",
                                                           "loss": None}]
  path = str(tmp_path / "curve.png")
  image = visualize.plot_loss_curve(records, path)
  assert os.path.getsize(path) > 1000 and image.shape[2] == 3


def test_importing_visualize_leaves_the_matplotlib_backend_alone():
  """A notebook's backend must survive `import audiomaepp.visualize` (and training)."""
  code = ("import matplotlib; matplotlib.use('svg'); import audiomaepp.visualize; "
          "print(matplotlib.get_backend())")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.stdout.strip() == "svg", done.stderr[-2000:]
