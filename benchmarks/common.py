"""Shared pieces of the benchmark scripts: the run's environment, tables, JSON and a matmul peak.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on sys.path).
"""
import datetime
import json
import os
import platform
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (key, header, format) of one table column; format is a str.format spec or a callable.
Column = tuple[str, str, Any]


def slug(name: str) -> str:
  """A row's folder name: lower case, runs of other characters as one underscore."""
  return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def environment() -> dict[str, Any]:
  """Where and when a benchmark ran: date, device, versions, host cores and load average.

  The load average is part of the record because these machines are often shared: a 2-core host
  with load 4 gives about half the single-job rate.
  """
  device = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "host_cpus": os.cpu_count(),
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def describe(env: dict[str, Any]) -> str:
  """One line for the top of a table: device x count, host cores and load."""
  load = "/".join(f"{x:.1f}" for x in env["load_average"])
  return (f"{env['device_kind']} x{env['device_count']} ({env['platform']}), "
          f"{env['host_cpus']} host cores, load {load}, jax {env['jax']}, {env['date_utc']}")


def _cell(value: Any, fmt: Any) -> str:
  if value is None:
    return "n/a"
  if callable(fmt):
    return fmt(value)
  return format(value, fmt)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
  """A Markdown table of `rows` (missing or None values print as 'n/a')."""
  lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
           "|" + "|".join("---:" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
  return "\n".join(lines)


def rate(value: float) -> str:
  """A rate for a table: one decimal from 10 up, three significant digits below."""
  return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def write_json(path: Optional[str], record: dict[str, Any]) -> None:
  """Writes `record` to `path` (no-op for an empty path), creating the parent folder."""
  if not path:
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1, default=_jsonable)
    f.write("\n")


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def timed(fn: Callable[[], Any]) -> float:
  """Seconds `fn()` takes, waiting for the device arrays it returns."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def default_matmul_size() -> int:
  """Square matmul size for `matmul_flops`: large enough to saturate the device, quick on CPU."""
  return 2048 if jax.devices()[0].platform == "cpu" else 8192


def matmul_flops(dtype: Any, size: int = 0, repeats: int = 10) -> float:
  """Achieved FLOP/s of a (size, size) @ (size, size) product in `dtype` on the default device.

  The best of `repeats` timed batches of 4 back-to-back products (dispatch overlaps execution),
  after a warm-up that compiles. This is the practical dense peak, the reference for MFU on
  devices without a datasheet entry (CPUs).
  """
  size = size or default_matmul_size()
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
  product = jax.jit(jnp.matmul)
  jax.block_until_ready(product(a, b))
  calls = 4
  best = min(timed(lambda: [product(a, b) for _ in range(calls)]) for _ in range(repeats))
  return calls * 2.0 * size ** 3 / best
