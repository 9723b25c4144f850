"""Workdir layout and Orbax checkpoints.

A workdir (from pretraining, or from `tools.import_original`) is a local path or a URL that
`etils.epath` and Orbax read natively (gs://bucket/runs/base; needs `gcsfs`). It holds:
  config.json            the resolved experiment config (the experiment record)
  checkpoints/<step>/    Orbax CheckpointManager steps; item `params` holds the model parameters;
                         pretraining adds `train_state` (step and optimiser state); the data
                         position is the step itself (data/pipeline.py), so nothing else is saved
  checkpoints_skipped/   damaged steps moved aside by `restore_with_fallback`

Both restores (`restore_with_fallback` for training, `restore_params` for everything that reads
parameters) try the steps newest first on every process, and process 0 decides for all from every
process's outcome (`classify_restore_error`): a provably damaged step (files missing or
truncated, an item missing, metadata that does not parse) is skipped; storage that does not
answer is retried with backoff, then `errors.StorageError`; a refused read is
`CheckpointPermissionError`; a tree of another structure is `StructureMismatchError`; no step
left is `NoRestorableCheckpointError`. Anything else is a bug and propagates with its traceback.
docs/reliability.md ("Restore semantics") has the table and the test of each row.

Saves are atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete; on GCS
it writes `<step>/commit_success.txt` last instead), so a process killed mid-save leaves the
previous steps intact; the temporary directory is removed the next time a training manager opens
the workdir.
"""
import contextlib
import dataclasses
import gc
import json
import logging as std_logging
import re
import sys
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
import numpy as np
from jax.experimental import multihost_utils

import audiomaepp
from audiomaepp import errors
from audiomaepp.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
SKIPPED_DIR = "checkpoints_skipped"
PARAMS_ITEM = "params"
# The key of a step's custom metadata that holds what the run recorded with it.
RECORD_KEY = "record"
TRAIN_STATE_ITEM = "train_state"

# Reading a step whose storage did not answer: this many attempts, waiting READ_BACKOFF_SECONDS,
# then twice that, ... between them.
READ_ATTEMPTS = 4
READ_BACKOFF_SECONDS = 2.0

# What a failed restore of a step means (`classify_restore_error`), in order of precedence when
# processes disagree: the first is no failure.
RESTORED, DAMAGED, UNREADABLE, DENIED, MISMATCH, BUG = range(6)
# Status codes (gRPC's, which TensorStore puts first in its errors) by what they say about a step:
# stored bytes missing or truncated; storage that did not answer (worth retrying, as gRPC advises
# for ABORTED too); a read refused. Any other code (INTERNAL, UNKNOWN, FAILED_PRECONDITION,
# CANCELLED, ...) says nothing about the step: a bug. TensorStore drops the INVALID_ARGUMENT prefix.
_DAMAGED_STATUS = {"DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE"}
_UNREADABLE_STATUS = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}
_DENIED_STATUS = {"PERMISSION_DENIED", "UNAUTHENTICATED"}
_STATUS = re.compile(r"^([A-Z_]+): ")
# What Orbax logs, as a warning, whenever a read-only manager is made.
_READ_ONLY_NOTICE = "Given directory is read only=%s"


class StructureMismatchError(UserError):
  """A checkpoint holds a tree of another structure than the one asked for (another model, or
  the optimiser state of another `grad_clip_norm` or `grad_accum_steps`)."""


class NoRestorableCheckpointError(UserError):
  """Checkpoints exist, but every one is damaged; the message names each step's problem."""


class CheckpointPermissionError(UserError):
  """Reading a checkpoint was refused (permission denied, no credentials)."""


# A checkpoint could not be read because storage did not answer, after retries.
StorageError = errors.StorageError


def workdir_path(workdir: Any) -> epath.Path:
  """`workdir` as an absolute `epath.Path`: local paths resolved, URLs (gs://...) as given."""
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.absolute()


def save_config(workdir: Any, config: ml_collections.ConfigDict) -> epath.Path:
  """Writes the resolved config (plus the package version) as JSON; returns its path."""
  directory = workdir_path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  record = json.loads(config.to_json_best_effort())
  record["_audiomaepp_version"] = audiomaepp.__version__
  path = directory / CONFIG_FILE
  tmp = directory / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
  tmp.replace(path)
  return path


def load_config(workdir: Any) -> ml_collections.ConfigDict:
  """Reads the config recorded in a workdir."""
  path = workdir_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a workdir written by main.py or "
        "audiomaepp.tools.import_original")
  record = read_json_object(path, "the experiment config")
  record.pop("_audiomaepp_version", None)
  return ml_collections.ConfigDict(record)


def read_json_object(path: epath.Path, what: str) -> dict:
  """The JSON object stored in `path` (`what` names its content in the error); UserError naming
  the file when it does not parse or is not an object."""
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e}); the file is damaged (truncated?)") from None
  if not isinstance(record, dict):
    raise UserError(f"{path}: expected a JSON object ({what}), got {type(record).__name__}")
  return record


def checkpoint_manager(workdir: Any, **options: Any) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager over `workdir/checkpoints` (options: CheckpointManagerOptions)."""
  return ocp.CheckpointManager(workdir_path(workdir) / CHECKPOINT_DIR,
                               options=ocp.CheckpointManagerOptions(**options))


def latest_complete_step(workdir: Any) -> Optional[int]:
  """The newest step under `workdir/checkpoints` whose save completed (Orbax's test: renamed from
  its temporary name, or on GCS holding its commit marker). Reads storage, not a manager, so any
  thread may call it, e.g. while the main thread is blocked on a lost host."""
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return None
  steps = [int(path.name) for path in directory.iterdir()
           if path.name.isdigit() and ocp.utils.is_checkpoint_finalized(path)]
  return max(steps, default=None)


def save_params(workdir: Any, params: Any, step: int = 0) -> None:
  """Saves model parameters alone as checkpoint `step` (used for imported checkpoints)."""
  with checkpoint_manager(workdir, enable_async_checkpointing=False) as manager:
    manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
    manager.wait_until_finished()


_UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


@contextlib.contextmanager
def _quiet_failed_reads():
  """Drops the echoes of a failed restore: the unraisable "Event loop is closed" errors
  TensorStore reports for every read still in flight once Orbax has closed its event loop, and
  asyncio's "Future exception was never retrieved" for the sibling reads of the one whose error
  was raised (and classified). Hundreds of tracebacks that say nothing about the checkpoint.
  Garbage is collected before leaving, so that those futures report while the filter holds.
  Other unraisable errors and log records pass."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  def unretrieved(record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_UNRETRIEVED)

  asyncio_logger = std_logging.getLogger("asyncio")
  sys.unraisablehook = hook
  asyncio_logger.addFilter(unretrieved)
  try:
    yield
  finally:
    gc.collect()
    asyncio_logger.removeFilter(unretrieved)
    sys.unraisablehook = previous


@_quiet_failed_reads()
def restore_params(workdir: Any, abstract_params: Any, step: Optional[int] = None,
                   subdir: str = CHECKPOINT_DIR) -> Any:
  """Restores the `params` item of checkpoint `step` (under `workdir/subdir`: the latest
  checkpoints, or e.g. a fine-tuning run's best), or by default of the newest step that reads
  back on every process, shaped like the target. Damaged newer steps are logged and skipped,
  never moved (the workdir may be read-only). With several processes, every one must call it.

  `abstract_params` is a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`
  of the model's init); arrays without a sharding are placed on this process's first device.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    UserError: `step` does not exist; or (subclasses) no step can be restored
      (`NoRestorableCheckpointError`), a read was refused (`CheckpointPermissionError`), the
      stored parameters have another structure (`StructureMismatchError`).
    errors.StorageError: storage did not answer, after retries.
    Any other exception: a bug, raised by the process that had it (RuntimeError on the others).
  """
  directory = workdir_path(workdir) / subdir
  reader = _host_reader(directory)
  try:
    steps = _steps_of_process_0(reader)
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    if step is not None:
      if step not in steps:
        raise UserError(f"{workdir} has no checkpoint step {step}; it has steps {sorted(steps)}")
      steps = [step]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or device),
        abstract_params)
    read = lambda candidate: reader.restore(
        candidate, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    try:
      found, restored, skipped = _restore_newest(read, steps, f"of {workdir}")
    except StructureMismatchError as e:
      raise StructureMismatchError(
          f"{e}; check that the model asked for is the one recorded in "
          f"{workdir_path(workdir) / CONFIG_FILE}") from None
  finally:
    reader.close()
  for damaged, reason in skipped:
    logging.warning("checkpoint step %d of %s cannot be restored (%s)", damaged, workdir, reason)
  if skipped:
    logging.warning("restored step %d of %s instead of the damaged newer steps %s", found,
                    workdir, [s for s, _ in skipped])
  else:
    logging.info("restored step %d of %s", found, workdir)
  return restored[PARAMS_ITEM]


def classify_restore_error(error: BaseException) -> int:
  """What a failed restore of a step says about it: DAMAGED (files or an item missing, bytes
  truncated, metadata that does not parse: only another step can help), UNREADABLE (storage did
  not answer: worth retrying), DENIED (the read was refused), MISMATCH (the stored tree has
  another structure than the one asked for: the config changed) or BUG (anything else)."""
  text = str(error)
  if isinstance(error, KeyError) and "was not found in the checkpoint" in text:
    return DAMAGED  # an item's directory is gone
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
    return DAMAGED
  if isinstance(error, PermissionError):
    return DENIED
  if isinstance(error, OSError):  # EIO, timeouts, connection resets
    return UNREADABLE
  if not isinstance(error, ValueError):
    return BUG
  if "tree structures do not match" in text or "is not compatible with the stored shape" in text:
    return MISMATCH
  if text.startswith("Found incomplete checkpoint"):
    return DAMAGED
  status = _STATUS.match(text)
  code = status.group(1) if status else None
  for outcome, codes in ((DAMAGED, _DAMAGED_STATUS), (UNREADABLE, _UNREADABLE_STATUS),
                         (DENIED, _DENIED_STATUS)):
    if code in codes:
      return outcome
  return BUG


def _read_step(read: Callable[[int], Any], step: int) -> tuple[Any, int, Optional[BaseException]]:
  """`read(step)`, attempted READ_ATTEMPTS times with exponential backoff while storage does not
  answer; returns (restored, RESTORED, None) or (None, outcome, error) of the last attempt."""
  attempt = 1
  while True:
    try:
      return read(step), RESTORED, None
    except Exception as e:  # pylint: disable=broad-except
      outcome = classify_restore_error(e)
      if outcome != UNREADABLE or attempt == READ_ATTEMPTS:
        return None, outcome, e
      delay = READ_BACKOFF_SECONDS * 2 ** (attempt - 1)
      attempt += 1
      logging.warning("reading checkpoint step %d failed (%s); attempt %d of %d in %.1f s", step,
                      _failure_reason(e), attempt, READ_ATTEMPTS, delay)
      time.sleep(delay)


def _failure_reason(error: BaseException) -> str:
  """'<type>: <first line>' of a failed restore, at most 300 characters."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _mismatch_reason(error: BaseException) -> str:
  """The first sentence of a structure mismatch (not Orbax's advice to pad or truncate), followed
  by the first paths Orbax says differ."""
  paths = [line[:-1] for line in str(error).splitlines()[1:]
           if line.endswith(":") and not line.startswith(" ")]
  listed = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
  return f"{_failure_reason(error).split('. ')[0]} {listed}".strip()


def training_manager(workdir: Any, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """The manager used by pretraining: keeps the last `keep` steps and saves asynchronously.

  Partial saves left by a killed or failed run are removed first, before it returns (Orbax's own
  `cleanup_tmp_directories` runs in the background and is not awaited by `close`).
  """
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  if jax.process_index() == 0 and directory.exists():
    for path in _temporary_paths(directory):
      logging.info("removing %s, a save that did not complete", path)
      _remove(path)
  return checkpoint_manager(workdir, max_to_keep=keep, enable_async_checkpointing=async_save,
                            create=True)


def save_train_state(manager: ocp.CheckpointManager, step: int, params: Any,
                     train_state: Any, record: Optional[dict] = None) -> None:
  """Starts saving `params` and `train_state` as step `step`, with `record` (JSON: the step's
  evaluation) in the step's metadata (`saved_record`).

  Returns once device arrays are copied to host; writing continues in the background (see
  `manager.wait_until_finished`). Errors of the background write surface there.
  """
  items = {PARAMS_ITEM: ocp.args.StandardSave(params),
           TRAIN_STATE_ITEM: ocp.args.StandardSave(train_state)}
  manager.save(step, args=ocp.args.Composite(**items), force=True,
               custom_metadata={RECORD_KEY: _json_values(record or {})})


def saved_record(workdir: str, step: int) -> dict:
  """What the run recorded with its checkpoint of `step` (e.g. {'loss': ..., 'probe': {task:
  score}}); {} when nothing was recorded."""
  with checkpoint_manager(workdir, read_only=True) as manager:
    metadata = manager.metadata(step)
  return dict((metadata.custom_metadata or {}).get(RECORD_KEY, {}))


def _json_values(record: dict) -> dict:
  """The numbers of `record` as Python floats (nested dicts kept, anything else left out), for
  the JSON metadata."""
  values = {}
  for key, value in record.items():
    if isinstance(value, dict):
      values[str(key)] = _json_values(value)
    elif np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
      values[str(key)] = float(value)
  return values


def discard_failed_save(manager: ocp.CheckpointManager, step: int) -> None:
  """Removes the temporary directory of a save that failed, so it does not hold disk space.

  Writes of the failed save that were still in flight can land while it is being removed; what
  remains is removed by the next start (`training_manager`).
  """
  if jax.process_index() != 0:
    return
  for path in _temporary_paths(epath.Path(manager.directory), step):
    _remove(path)


def _temporary_paths(directory: epath.Path, step: Optional[int] = None) -> list[epath.Path]:
  """Orbax's temporary directories of unfinished saves (of `step`, or of any step)."""
  return sorted(directory.glob(f"{'*' if step is None else step}.orbax-checkpoint-tmp*"))


def _remove(path: epath.Path, attempts: int = 10) -> None:
  """Removes a directory tree, retrying while in-flight writes add files to it."""
  for attempt in range(attempts):
    try:
      path.rmtree(missing_ok=True)
      return
    except OSError as e:
      if attempt == attempts - 1:
        logging.warning("could not remove %s yet (%s); the next start removes it", path, e)
      time.sleep(0.2)


@dataclasses.dataclass
class Restored:
  """A restored training checkpoint and the newer steps that could not be read."""
  step: int
  params: Any
  train_state: Any
  skipped: list[tuple[int, str]]


@_quiet_failed_reads()
def restore_with_fallback(manager: ocp.CheckpointManager, abstract_params: Any,
                          abstract_train_state: Any) -> Optional[Restored]:
  """Restores the newest step that reads back completely on every process; None when there is
  no checkpoint. Damaged newer steps are logged and moved to `checkpoints_skipped/` (kept for
  inspection, out of the way of later saves of their step numbers).

  Abstract trees are `jax.ShapeDtypeStruct`s with shardings; other items of a step (the
  `data_iter` of checkpoints written before the data order was derived from the step) are not
  read. A failure raises what `restore_params` raises, and moves nothing.
  """
  reader = _host_reader(manager.directory)
  items = {PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
           TRAIN_STATE_ITEM: ocp.args.StandardRestore(abstract_train_state)}
  read = lambda step: reader.restore(step, args=ocp.args.Composite(**items))
  try:
    steps = _steps_of_process_0(manager)
    if not steps:
      return None
    try:
      step, restored, skipped = _restore_newest(read, steps, f"under {manager.directory}")
    except NoRestorableCheckpointError as e:
      raise NoRestorableCheckpointError(
          f"{e}; move the directory away to start from scratch") from None
  finally:
    reader.close()
  for damaged, reason in skipped:
    logging.warning("checkpoint step %d cannot be restored, skipping it (%s)", damaged, reason)
  if skipped:
    _move_aside(manager, [s for s, _ in skipped])
    logging.warning("restored step %d after skipping damaged steps %s", step,
                    [s for s, _ in skipped])
  return Restored(step, restored[PARAMS_ITEM], restored[TRAIN_STATE_ITEM], skipped)


def _restore_newest(read: Callable[[int], Any], steps: list[int],
                    where: str) -> tuple[int, Any, list[tuple[int, str]]]:
  """The first of `steps` that reads back on every process: (step, `read(step)`, the damaged steps
  before it with their reasons). `where` names the checkpoints in messages ('of WORKDIR').

  Every process reads each step (retried while storage does not answer); process 0 decides from
  all outcomes (`_decide`) and every process acts on the decision: DAMAGED tries the next step;
  UNREADABLE, DENIED and MISMATCH raise their one-line errors; BUG re-raises the exception on the
  process that had it, RuntimeError on the others. Moves nothing.
  """
  skipped = []
  for step in steps:
    restored, outcome, error = _read_step(read, step)
    decision = _decide(outcome)
    if decision == RESTORED:
      return step, restored, skipped
    name = f"checkpoint step {step} {where}"
    mine = outcome == decision
    if decision == BUG:
      if mine:
        raise error
      raise RuntimeError(f"another process failed to restore {name} (see its log)")
    if decision == DAMAGED:
      skipped.append((step, _failure_reason(error) if mine else
                      "damaged as another process read it"))
    elif decision == UNREADABLE:
      raise StorageError(
          f"{name} could not be read after {READ_ATTEMPTS} attempts ("
          + (_failure_reason(error) if mine else "storage did not answer another process")
          + "); nothing was moved: try again once storage answers") from (error if mine else None)
    elif decision == DENIED:
      raise CheckpointPermissionError(
          f"{name} could not be read: permission denied ("
          + (_failure_reason(error) if mine else "on another process")
          + "); nothing was moved: check the credentials and permissions for it") from None
    else:
      raise StructureMismatchError(
          f"{name}: " + (_mismatch_reason(error) if mine else
                         "holds a tree of another structure (seen by another process)")) from None
  raise NoRestorableCheckpointError(
      f"no checkpoint {where} can be restored ("
      + "; ".join(f"step {step}: {reason}" for step, reason in skipped) + ")")


def _host_reader(directory: Any) -> ocp.CheckpointManager:
  """A read-only manager for this process alone: its restores wait for no other process (Orbax
  ends each restore at a barrier of all processes, where hosts whose read failed never arrive),
  so that the hosts can agree on the outcome (`_decide`) instead. Made without Orbax's warning
  that it is read-only: reading is what it is for."""
  me = jax.process_index()
  notice = lambda record: record.msg != _READ_ONLY_NOTICE
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(notice)
  try:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me,
                                                                   active_processes={me})))
  finally:
    absl_logger.removeFilter(notice)


def _steps_of_process_0(manager: ocp.CheckpointManager) -> list[int]:
  """The manager's steps as process 0 lists them, newest first, on every process."""
  steps = np.asarray(sorted(manager.all_steps(), reverse=True), np.int64)
  if jax.process_count() == 1:
    return steps.tolist()
  count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
  if jax.process_index() != 0:
    steps = np.zeros(count, np.int64)
  return np.asarray(multihost_utils.broadcast_one_to_all(steps)).tolist()


def _decide(outcome: int) -> int:
  """Process 0's decision on a step from every process's `outcome` (the gravest: BUG, MISMATCH,
  DENIED, UNREADABLE, DAMAGED, then RESTORED), broadcast so that every process acts on it."""
  if jax.process_count() == 1:
    return outcome
  outcomes = multihost_utils.process_allgather(np.int32(outcome))
  return int(multihost_utils.broadcast_one_to_all(np.int32(np.max(outcomes))))


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged steps to `checkpoints_skipped/` (kept for inspection, never deleted)."""
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    target = directory.parent / SKIPPED_DIR
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      destination = target / str(step)
      suffix = 1
      while destination.exists():
        destination, suffix = target / f"{step}.{suffix}", suffix + 1
      (directory / str(step)).rename(destination)
      logging.warning("moved damaged checkpoint step %d to %s", step, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("audiomaepp_checkpoint_move_aside")
  manager.reload()
