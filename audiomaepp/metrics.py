"""Training metrics: throughput, MFU, ETA, and writers for the console, TensorBoard and JSONL.

`DIR/metrics.jsonl` holds one JSON object per line, each with `step`, `split` ('train' or 'eval')
and `loss`; train lines add `lr`, `grad_norm`, `samples_per_sec`, `eta_s` and, where the device's
peak is known, `mfu`.
"""
import json
import math
import os
import time
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bfloat16 peak FLOP/s per device (chip), matched in order against `device_kind`.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one device: `override` when > 0, else from the table, else None (unknown)."""
  if override > 0:
    return float(override)
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None


class Throughput:
  """Samples/s, model FLOPs utilisation and ETA between two log points (host clock only)."""

  def __init__(self, *, global_batch: int, flops_per_sample: Optional[float],
               peak_flops_total: Optional[float], total_steps: int, start_step: int):
    self._batch = global_batch
    self._flops = flops_per_sample
    self._peak = peak_flops_total
    self._total = total_steps
    self._step = start_step
    self._time = time.perf_counter()

  def restart(self, step: int) -> None:
    """Forgets time spent outside training (evaluation, checkpoint waits) before `step`."""
    self._step, self._time = step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    """Rates over the steps since the last call; call after the step's results are fetched."""
    now = time.perf_counter()
    steps, seconds = step - self._step, now - self._time
    self._step, self._time = step, now
    if steps <= 0 or seconds <= 0:
      return {}
    samples_per_sec = steps * self._batch / seconds
    out = {"samples_per_sec": samples_per_sec,
           "eta_s": (self._total - step) * seconds / steps}
    if self._flops and self._peak:
      out["mfu"] = samples_per_sec * self._flops / self._peak
    return out


def _finite_or_none(value: float) -> Optional[float]:
  # JSON has no NaN; a non-finite loss is recorded as null next to a `nonfinite` flag.
  return value if math.isfinite(value) else None


class MetricsWriter:
  """Writes scalars and images to the console, TensorBoard event files and `metrics.jsonl`.

  On resume from `start_step`, JSONL lines past it (written by the interrupted run after its last
  checkpoint, or cut short by a kill) are dropped and TensorBoard purges the same steps, so each
  step appears once. With `total_steps`, a console line names the step as the run's progress:
  `[train 250/1000 25.0%] loss=...`. Only process 0 writes.
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True,
               total_steps: Optional[int] = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.path = epath.Path(workdir) / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_jsonl(self.path, start_step)
    from tensorboardX import SummaryWriter  # heavy import, only on the writing process
    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step + 1,
                             flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
    """Logs one line to the console and appends it to TensorBoard and the JSONL file."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%s %s] %s", split, progress(step, self.total_steps),
                 ", ".join(f"{k}={_format(k, v)}" for k, v in values.items()))
    for key, value in values.items():
      if math.isfinite(value):
        self._tb.add_scalar(f"{split}/{key}", value, step)
    record = {"step": int(step), "split": split}
    record.update({k: _finite_or_none(v) for k, v in values.items()})
    if not all(math.isfinite(v) for v in values.values()):
      record["nonfinite"] = True
    _append_line(self.path, json.dumps(record) + "\n")

  def write_image(self, tag: str, step: int, image: np.ndarray) -> None:
    """Adds an (height, width, 3) uint8 image to TensorBoard."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: Any) -> list[dict[str, Any]]:
  """The records of a metrics JSONL file (a local path or a gs:// URL), skipping a torn line."""
  records = []
  path = epath.Path(path)
  if not path.exists():
    return records
  with path.open() as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Keeps the records with step <= last_step (atomically rewritten)."""
  if not path.exists():
    return
  kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
  tmp.replace(path)


def _append_line(path: epath.Path, line: str) -> None:
  """Appends one line; object stores (gs://) cannot append, so there the file is rewritten."""
  if "://" in str(path):
    path.write_text((path.read_text() if path.exists() else "") + line)
    return
  with path.open("a") as f:
    f.write(line)


def progress(step: int, total_steps: Optional[int]) -> str:
  """'250/1000 25.0%' (or '250' when the total is unknown): where a console line stands."""
  if not total_steps:
    return str(step)
  return f"{step}/{total_steps} {100 * step / total_steps:.1f}%"


def _format(key: str, value: float) -> str:
  if key == "eta_s" and math.isfinite(value):
    seconds = int(value)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
  return f"{value:.4g}"
