"""Pictures of pretraining: spectrogram reconstructions and loss curves (matplotlib figures drawn
by the Agg canvas directly: importing this module leaves pyplot's backend alone)."""
import os
from typing import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from etils import epath

from audiomaepp import metrics


def _figure(**kwargs) -> Figure:
  """A figure with its own Agg canvas (no pyplot state)."""
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _render(fig: Figure, path: str) -> np.ndarray:
  """Saves `fig` to `path` (atomically; a local path or a gs:// URL) and returns it as an
  (height, width, 3) uint8 image."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  tmp = target.parent / (target.name + ".tmp.png")
  with tmp.open("wb") as f:
    fig.savefig(f, format="png")
  tmp.replace(target)
  return image


def plot_reconstruction(spectrogram: np.ndarray, pixel_mask: np.ndarray,
                        reconstruction: np.ndarray, path: str, title: str = "") -> np.ndarray:
  """Input, masked input and reconstruction side by side; returns the picture as an array.

  `spectrogram`, `reconstruction`: (time, mel); `pixel_mask`: (time, mel), 1 where the patch was
  removed. The reconstruction panel shows the model's prediction on the removed patches and the
  input on the visible ones (as the MAE paper's figures).
  """
  spectrogram = np.asarray(spectrogram, np.float32)
  pixel_mask = np.asarray(pixel_mask, bool)
  masked = np.where(pixel_mask, np.nan, spectrogram)
  pasted = np.where(pixel_mask, np.asarray(reconstruction, np.float32), spectrogram)
  lo, hi = np.percentile(spectrogram, [1, 99])
  fig = _figure(figsize=(8, 7))
  axes = fig.subplots(3, 1, sharex=True)
  cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.85")  # removed patches in light grey
  panels = (("input", spectrogram), (f"masked input ({pixel_mask.mean():.0%} removed)", masked),
            ("reconstruction (removed patches predicted)", pasted))
  for ax, (name, image) in zip(axes, panels):
    ax.imshow(image.T, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
              interpolation="nearest")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("mel bin")
  axes[-1].set_xlabel("frame")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _render(fig, path)


def plot_loss_curve(records: Sequence[dict], path: str) -> np.ndarray:
  """Train and eval loss against step from metrics records (see `metrics.read_jsonl`)."""
  fig = _figure(figsize=(7, 4))
  ax = fig.subplots()
  for split, style in (("train", "-"), ("eval", "o-")):
    points = [(r["step"], r["loss"]) for r in records
              if r.get("split") == split and r.get("loss") is not None]
    if points:
      steps, losses = zip(*points)
      ax.plot(steps, losses, style, label=f"{split} loss", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("masked-patch MSE")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return _render(fig, path)


def plot_loss_curve_from_workdir(workdir: str, path: str) -> np.ndarray:
  """`plot_loss_curve` of a workdir's metrics.jsonl."""
  return plot_loss_curve(metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE)), path)
