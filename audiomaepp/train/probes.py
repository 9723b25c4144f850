"""Linear probes of the encoder while it pretrains (`config.probe`).

Every `config.probe.every_steps` (or, with `probe.doubling`, at every_steps x 1, 2, 4, ...; and
at the last step) the pretraining job embeds the clips of
each HEAR task folder of `config.probe.tasks` with the current encoder, as the HEAR API does
(`hear_api.log_mel_chunks`: standardised log-mel chunks; the scene embedding is the mean of the
real frames) but on the first `config.probe.chunks_per_clip` chunks of each clip only (a 2-s clip
makes 201 log-mel frames, two chunks of 200 for the HEAR API: cut to one, it costs half), on the
training devices: the chunks go through in global batches sharded like
training batches, each host feeding its rows. The probe scores every clip (`probe_score`: top-1 %
or mAP %): the clips of each split are predicted by ridge classifiers on standardised embeddings
fit on the task's other splits (cross-fitting; a HEAR task keeps a source in one split, so no
source is on both sides of a fit). Scored on every clip, a probe of a few dozen clips per task
moves in finer steps than one scored on the test split alone, and ranks encoders more nearly as
the HEAR protocol does (docs/results.md). A task's clips are decoded once, at its first probe; a
task that fails (its folder deleted under the run) is dropped with one warning on every host and
training goes on.
"""
import dataclasses
import time
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from audiomaepp import audio as audio_lib
from audiomaepp import hear_api
from audiomaepp.audio import features
from audiomaepp.errors import UserError
from audiomaepp.evaluation import embedding
from audiomaepp.evaluation import tasks as tasks_lib

# Clips decoded and turned into log-mel chunks per call while a task is read.
_CLIPS_PER_READ = 64
# The ridge penalties a probe chooses from (by leave-one-out on its fit clips).
RIDGE_ALPHAS = tuple(np.logspace(0, 4, 9))


def task_dirs(config: ml_collections.ConfigDict) -> list[str]:
  """The task folders of `config.probe.tasks` (comma-separated; empty: no probes)."""
  return [t.strip() for t in str(config.probe.tasks or "").split(",") if t.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.probe` and each task folder's metadata, labels and splits (no audio is
  read); raises UserError naming the field, the folder and what was expected."""
  dirs = task_dirs(config)
  if not dirs:
    return
  if int(config.probe.max_clips) < 0:
    raise UserError(f"config.probe.max_clips={config.probe.max_clips}: expected 0 (every clip) "
                    "or a positive number of clips per task")
  if int(config.probe.chunks_per_clip) < 0:
    raise UserError(f"config.probe.chunks_per_clip={config.probe.chunks_per_clip}: expected 0 "
                    "(the whole clip) or a positive number of encoder inputs per clip")
  if int(config.probe.every_steps) <= 0:
    raise UserError(f"config.probe.every_steps={config.probe.every_steps}: expected a positive "
                    "integer when config.probe.tasks is set")
  names = {}
  for task_dir in dirs:
    try:
      task = tasks_lib.read_hear_task(task_dir)
      splits = probe_splits(task.metadata)
    except (UserError, OSError) as e:
      raise UserError(f"config.probe.tasks: {task_dir}: {e}") from None
    for split in splits:
      if not task.splits[split].files:
        raise UserError(f"config.probe.tasks: {task_dir}: split {split!r} has no clips")
    if task.name in names:
      raise UserError(f"config.probe.tasks: {task_dir} and {names[task.name]} have the same "
                      f"name {task.name!r}")
    names[task.name] = task_dir


def due(step: int, probe: ml_collections.ConfigDict, total_steps: int) -> bool:
  """Whether probes run after `step`: every `probe.every_steps` steps, or with `probe.doubling`
  at every_steps, 2 x every_steps, 4 x every_steps, ... (budgets evenly spaced on a log scale);
  and at the last step."""
  every = int(probe.every_steps)
  if step == total_steps:
    return True
  if probe.doubling:
    return step >= every and step % every == 0 and (step // every) & (step // every - 1) == 0
  return step % every == 0


def probe_splits(metadata: dict[str, Any]) -> list[str]:
  """The splits a probe crosses (train, valid and test of hear-eval-kit's first run; every fold
  of a fold-based task)."""
  run = tasks_lib.data_splits(metadata)[0]
  return [*run["train"], *run["valid"], *run["test"]]


def ridge_classifier() -> Any:
  """The probe's classifier: standardisation, then ridge classifiers with the penalty of
  RIDGE_ALPHAS of least leave-one-out error on the fit clips (an unfitted sklearn pipeline)."""
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel
  from sklearn import pipeline  # pylint: disable=import-outside-toplevel
  from sklearn import preprocessing  # pylint: disable=import-outside-toplevel
  return pipeline.make_pipeline(preprocessing.StandardScaler(),
                                linear_model.RidgeClassifierCV(alphas=RIDGE_ALPHAS))


def probe_score(x: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> float:
  """Score (%) on every clip of ridge classifiers on standardised embeddings, each fold's clips
  predicted by one fit on the other folds (its penalty of RIDGE_ALPHAS by leave-one-out on the
  fit clips): top-1 accuracy for class indices (n,), mAP over the pooled scores (macro over the
  classes present) for multi-hot targets (n, classes)."""
  from sklearn import metrics  # pylint: disable=import-outside-toplevel
  multilabel = targets.ndim == 2
  classes = targets.shape[1] if multilabel else int(targets.max()) + 1
  scores = np.full((len(x), classes), -np.inf)
  for fold in np.unique(folds):
    test = folds == fold
    model = ridge_classifier().fit(x[~test], targets[~test])
    seen = model.classes_ if not multilabel else np.arange(classes)
    decision = model.decision_function(x[test]).reshape(int(test.sum()), -1)
    if len(seen) == 2 and not multilabel:  # one column: the second class's margin
      decision = np.concatenate([-decision, decision], axis=1)
    scores[np.ix_(test, seen)] = decision
  if not multilabel:
    return 100 * float((scores.argmax(1) == targets).mean())
  present = targets.sum(0) > 0
  return 100 * float(metrics.average_precision_score(targets[:, present], scores[:, present],
                                                     average="macro"))


@dataclasses.dataclass(frozen=True)
class ProbeData:
  """One task's clips as encoder inputs: log-mel chunks of every clip (split by split), the
  padding frames per clip, the targets (class indices, or multi-hot when multi-label) and each
  clip's split (its index in `probe_splits`)."""
  name: str
  chunks: np.ndarray  # (clips · chunks_per_clip, chunk_frames, mel) float32
  pad: int
  targets: np.ndarray
  folds: np.ndarray


def balanced_subset(labels: list[list[str]], count: int) -> list[int]:
  """Indices of `count` of the clips (all when count <= 0 or there are fewer), taken in turn
  from each class (a clip's first label) in file order, returned in file order."""
  if count <= 0 or count >= len(labels):
    return list(range(len(labels)))
  turn, seen = {}, {}
  for i, row in enumerate(labels):
    turn[i] = seen.get(row[0], 0)
    seen[row[0]] = turn[i] + 1
  return sorted(sorted(turn, key=lambda i: (turn[i], i))[:count])


def read_task(task_dir: str, chunk_frames: int, max_clips: int = 0,
              chunks_per_clip: int = 0) -> ProbeData:
  """Decodes a task folder's clips (cut or zero-padded to `sample_duration`, or to the longest
  clip) into encoder inputs; with `max_clips` > 0, about that many, a class-balanced subset of
  each split in the splits' proportion; with `chunks_per_clip` > 0, each clip cut to the samples
  that make at most that many chunks."""
  task = tasks_lib.read_hear_task(task_dir)
  splits = probe_splits(task.metadata)
  total = sum(len(task.splits[s].labels) for s in splits)
  paths, labels, folds = [], [], []
  for fold, split in enumerate(splits):
    rows = task.splits[split].labels
    count = max(1, round(max_clips * len(rows) / total)) if 0 < max_clips < total else 0
    keep = balanced_subset(rows, count)
    paths += [task.splits[split].paths[i] for i in keep]
    labels += [rows[i] for i in keep]
    folds += [fold] * len(keep)
  waveforms = [audio_lib.load_audio(str(p)) for p in paths]
  duration = task.metadata.get("sample_duration")
  length = (int(round(duration * hear_api.SAMPLE_RATE)) if duration
            else max(len(w) for w in waveforms))
  if chunks_per_clip > 0:
    # The longest clip whose 1 + samples // hop log-mel frames fit the chunks.
    length = min(length, chunks_per_clip * chunk_frames * features.HOP_LENGTH - 1)
  chunks, pad = [], 0
  for start in range(0, len(waveforms), _CLIPS_PER_READ):
    batch = np.stack([embedding.fit_length(w, length)
                      for w in waveforms[start:start + _CLIPS_PER_READ]])
    piece, _, pad = hear_api.log_mel_chunks(batch, chunk_frames)
    chunks.append(np.asarray(piece))
  targets = tasks_lib.multi_hot(labels, task.vocabulary)
  if task.metadata["prediction_type"] != "multilabel":
    targets = targets.argmax(1)
  return ProbeData(task.name, np.concatenate(chunks), pad, targets, np.asarray(folds))


class Probes:
  """The probes of one pretraining run: `run(params, step)` -> {task name: score %}."""

  def __init__(self, config: ml_collections.ConfigDict, module: Any, placement: Any):
    self._dirs = task_dirs(config)
    self._chunk_frames = int(module.config.input_shape[0])
    self._max_clips = int(config.probe.max_clips)
    self._chunks_per_clip = int(config.probe.chunks_per_clip)
    self._patch_time = int(module.config.patch_size[0])
    # Global batches of chunks: the training batch, at least 64 rows.
    self._batch = config.batch_size * max(1, -(-64 // config.batch_size))
    self._rows = placement.block
    self._data: dict[str, Optional[ProbeData]] = {}

    def encode(params, chunks):
      out = module.apply({"params": params}, chunks, method=module.encode,
                         frame_layout="time_major")
      return out["frames"].astype(np.float32)
    self._encode = placement.jit(encode, in_shardings=(placement.state.params, placement.batch),
                                 out_shardings=placement.replicated)
    self._placement = placement

  @property
  def active(self) -> bool:
    """Whether any task is left to probe."""
    return bool(self._dirs)

  def run(self, params: Any, step: int) -> dict[str, float]:
    """Probes every task with `params`; returns the scores and the seconds it took."""
    start = time.perf_counter()
    scores = {}
    for task_dir in list(self._dirs):
      data = self._load(task_dir, step)
      if data is None:
        continue
      embeddings = self.embed(params, data)
      try:
        scores[data.name] = probe_score(embeddings, data.targets, data.folds)
      except ValueError as e:  # e.g. a fit with one class only
        self._drop(task_dir, step, e)
    if scores:
      scores["seconds"] = time.perf_counter() - start
    return scores

  def embed(self, params: Any, data: ProbeData) -> np.ndarray:
    """Scene embeddings (clips, features) of `data` under `params`."""
    size, (index, count) = self._batch, self._rows
    rows = size // count
    frames = []
    for start in range(0, len(data.chunks), size):
      batch = data.chunks[start:start + size]
      batch = np.pad(batch, ((0, size - len(batch)), (0, 0), (0, 0)))
      host_rows = batch[index * rows:(index + 1) * rows]
      global_batch = jax.make_array_from_process_local_data(self._placement.batch, host_rows)
      frames.append(np.asarray(self._encode(params, global_batch)))
    frames = np.concatenate(frames)[:len(data.chunks)]
    clips = len(data.targets)
    return np.asarray(hear_api.real_frames(frames, clips, data.pad, self._patch_time)).mean(1)

  def _load(self, task_dir: str, step: int) -> Optional[ProbeData]:
    """The task's data, read at its first probe; None (and the task dropped on every host) when
    any host cannot read it."""
    if task_dir not in self._data:
      error = None
      try:
        self._data[task_dir] = read_task(task_dir, self._chunk_frames, self._max_clips,
                                            self._chunks_per_clip)
      except (UserError, OSError, ValueError) as e:
        error = e
      failed = np.int32(error is not None)
      if jax.process_count() > 1:
        failed = np.max(multihost_utils.process_allgather(failed))
      if failed:
        self._drop(task_dir, step, error or "another host could not read it")
        return None
    return self._data[task_dir]

  def _drop(self, task_dir: str, step: int, error: Any) -> None:
    logging.warning("probe of %s failed at step %d (%s); training goes on without it", task_dir,
                    step, error)
    self._dirs.remove(task_dir)
    self._data.pop(task_dir, None)

