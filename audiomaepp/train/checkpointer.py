"""The run's checkpoints while it trains: the latest train states (saved asynchronously) and the
parameters with the best validation score."""
import os
import re
from typing import Any, Optional

import orbax.checkpoint as ocp
from absl import logging

from audiomaepp import checkpointing
from audiomaepp.train.state import TrainState

BEST_DIR = "best"


class Checkpointer:
  """Saves train states asynchronously and reports failed writes without stopping training."""

  def __init__(self, workdir: str, keep: int):
    self.manager = checkpointing.training_manager(workdir, keep)
    self._workdir = workdir
    self._pending: Optional[int] = None

  def wait(self) -> Optional[str]:
    """Waits for the save in flight; returns an error message if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    return None

  def save(self, step: int, state: TrainState, record: Optional[dict] = None) -> Optional[str]:
    """Starts saving `state` as `step` (with `record`, the evaluation of that step) after the
    previous save finished; returns an error."""
    error = self.wait()
    params, rest = state.checkpoint_items()
    try:
      checkpointing.save_train_state(self.manager, step, params, rest, record)
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(step, e)
    self._pending = step
    return error

  def _failed(self, step: Optional[int], error: BaseException) -> str:
    """Removes what the failed save of `step` wrote; logs and returns the report."""
    if step is not None:
      checkpointing.discard_failed_save(self.manager, step)
    # From storage: after a failed background save Orbax's own step list may have dropped the
    # previous step (keep_checkpoints=1), which is still on disk and restorable.
    latest = checkpointing.latest_complete_step(self._workdir)
    message = (f"checkpoint save at step {step} failed ({describe_error(error)}); "
               f"latest complete checkpoint: {latest}")
    logging.error(message)
    return message

  def latest_step(self) -> Optional[int]:
    """The newest step saved (or restored) by this manager."""
    return self.manager.latest_step()

  def close(self) -> None:
    """Waits for the save in flight and closes the manager."""
    self.wait()
    self.manager.close()


class BestCheckpoint:
  """The parameters with the best validation score, in `workdir/best/` (one step kept)."""

  def __init__(self, workdir: str):
    self.manager = ocp.CheckpointManager(
        checkpointing.workdir_path(workdir) / BEST_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["score"], best_mode="max",
            enable_async_checkpointing=False, create=True))

  def score(self) -> Optional[float]:
    """The best validation score so far (None before the first save)."""
    step = self.manager.best_step()
    return None if step is None else float(self.manager.metrics(step)["score"])

  def offer(self, step: int, params: Any, score: float) -> bool:
    """Saves `params` if `score` beats the best so far; returns whether it did."""
    best = self.score()
    if best is not None and score <= best:
      return False
    self.manager.save(step, args=ocp.args.Composite(
        **{checkpointing.PARAMS_ITEM: ocp.args.StandardSave(params)}),
                      metrics={"score": float(score)}, force=True)
    self.manager.wait_until_finished()
    return True

  def restore(self, abstract_params: Any) -> tuple[int, Any]:
    """(step, parameters) of the best checkpoint, shaped and sharded like `abstract_params`."""
    step = self.manager.best_step()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{checkpointing.PARAMS_ITEM: ocp.args.StandardRestore(abstract_params)}))
    return step, restored[checkpointing.PARAMS_ITEM]

  def close(self) -> None:
    """Closes the manager."""
    self.manager.close()


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def describe_error(error: BaseException, limit: int = 400) -> str:
  """'<type>: <cause>: <first line>' for a failed write.

  The cause ('No space left on device', 'File too large') comes first: TensorStore names it only
  by its errno (`os_error_code='27'`) at the end of a long line of paths and JSON specs.
  """
  text = str(error).strip()
  line = text.splitlines()[0] if text else ""
  if len(line) > limit:
    line = f"{line[:limit // 2]} ... {line[-limit // 2:]}"
  code = getattr(error, "errno", None)
  if code is None:
    match = _OS_ERROR_CODE.search(text)
    code = int(match.group(1)) if match else None
  cause = os.strerror(code) if code else ""
  prefix = f"{cause}: " if cause and cause not in line else ""
  return f"{type(error).__name__}: {prefix}{line}"
