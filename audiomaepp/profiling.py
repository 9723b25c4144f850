"""Traces of chosen training steps (`config.profile_steps='a,b'`) for TensorBoard's profiler.

The trace of steps a to b (inclusive, as numbered in the logs) goes to
`WORKDIR/plugins/profile/<time>/<host>.xplane.pb`, where `tensorboard --logdir=WORKDIR` shows it
in the Profile tab (the `tensorboard-plugin-profile` package). Every process traces its own
devices. A run resumed past `a` traces from its first step up to `b`.
"""
from typing import Any, Optional

import jax
from absl import logging

from audiomaepp.errors import UserError


def parse_steps(value: Any) -> Optional[tuple[int, int]]:
  """`config.profile_steps` as (first, last), both inclusive: 'a,b' or 'a'; '' is None."""
  text = str(value).strip()
  if not text:
    return None
  try:
    steps = [int(part) for part in text.split(",")]
  except ValueError:
    steps = []
  if len(steps) not in (1, 2) or steps[0] < 1 or steps[-1] < steps[0]:
    raise UserError(f"config.profile_steps={value!r}: expected 'a,b' with 1 <= a <= b (the "
                    "steps to trace), 'a' for one step, or '' for none")
  return steps[0], steps[-1]


class StepProfiler:
  """Starts a `jax.profiler` trace before the first traced step and stops it after the last."""

  def __init__(self, profile_steps: Any, log_dir: str):
    self.steps = parse_steps(profile_steps)
    self.log_dir = log_dir
    self.active = False

  def before(self, step: int) -> None:
    """Called before step `step` is dispatched."""
    if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
      self.steps = (step, self.steps[1])

  def after(self, step: int, outputs: Any) -> None:
    """Called after step `step` is dispatched, with what it returned (waited for here)."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.close()
      logging.info("profiled steps %d-%d: tensorboard --logdir=%s (Profile tab)", *self.steps,
                   self.log_dir)
      self.steps = None

  def close(self) -> None:
    """Stops a trace still running (a run that ended or failed inside the traced steps)."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
