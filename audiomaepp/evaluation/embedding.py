"""Scene embeddings of HEAR task folders and audio files, from a model or a baseline.

`embed_task` writes a task's embeddings in this project's layout (`evaluation.tasks`), in
hear-eval-kit's (`evaluation.heareval`) or both; `tools.embed` is its command line.
"""
import collections
import dataclasses
import os
from typing import Callable, Dict, List, Sequence

from absl import logging
import numpy as np
import tqdm

from audiomaepp import audio as audio_lib
from audiomaepp import hear_api
from audiomaepp.errors import UserError
from audiomaepp.evaluation import baselines
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import tasks as tasks_lib

LAYOUTS = ("audiomaepp", "heareval", "both")


@dataclasses.dataclass(frozen=True)
class Embedder:
  """Scene embeddings (clips, size) of equal-length 16 kHz clips (clips, samples)."""
  embed: Callable[[np.ndarray], np.ndarray]
  size: int
  sample_rate: int = hear_api.SAMPLE_RATE


def model_embedder(model: hear_api.Model) -> Embedder:
  """The HEAR API's scene embeddings of `model`."""
  return Embedder(lambda audio: np.asarray(hear_api.get_scene_embeddings(audio, model)),
                  model.scene_embedding_size, model.sample_rate)


def baseline_embedder(name: str) -> Embedder:
  """A baseline of `audiomaepp.evaluation.baselines` by name."""
  if name not in baselines.BASELINES:
    raise ValueError(f"baseline {name!r}: expected one of {list(baselines.BASELINES)}")
  return Embedder(*baselines.BASELINES[name])


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
  """Zero-pads or trims to the task's clip length, as HEAR's evaluation kit does."""
  if waveform.shape[0] >= num_samples:
    return waveform[:num_samples]
  return np.pad(waveform, (0, num_samples - waveform.shape[0]))


def embed_files(paths: Sequence[str], embedder: Embedder, num_samples: int | None = None,
                batch_seconds: float = 640.0, progress: tqdm.tqdm | None = None) -> np.ndarray:
  """Scene embeddings (len(paths), D) of audio files, batching clips of equal length."""
  waveforms = {}
  by_length: Dict[int, List[int]] = collections.defaultdict(list)
  for index, path in enumerate(paths):
    waveform = audio_lib.load_audio(path)
    if num_samples:
      waveform = fit_length(waveform, num_samples)
    waveforms[index] = waveform
    by_length[waveform.shape[0]].append(index)
  embeddings = np.zeros((len(paths), embedder.size), np.float32)
  for length, indices in by_length.items():
    per_batch = max(1, int(batch_seconds * embedder.sample_rate) // length)
    for start in range(0, len(indices), per_batch):
      batch = indices[start:start + per_batch]
      audio = np.stack([waveforms.pop(i) for i in batch])
      try:
        embeddings[batch] = embedder.embed(audio)
      except UserError as e:  # its "sounds [i]" count within this batch of files
        names = [str(paths[i]) for i in batch]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{listed}: {e}") from None
      if progress is not None:
        progress.update(len(batch))
  return embeddings


def timestamp_embeddings(paths: Sequence[str], model: hear_api.Model, batch_seconds: float = 640.0
                         ) -> List[tuple[np.ndarray, np.ndarray]]:
  """Per file, the HEAR API's frame embeddings (frames, D) and their times in ms (frames,),
  batching files of equal length."""
  by_length: Dict[int, List[tuple[int, np.ndarray]]] = collections.defaultdict(list)
  for index, path in enumerate(paths):
    waveform = audio_lib.load_audio(path)
    by_length[waveform.shape[0]].append((index, waveform))
  results: List = [None] * len(paths)
  for length, items in by_length.items():
    per_batch = max(1, int(batch_seconds * model.sample_rate) // length)
    for start in range(0, len(items), per_batch):
      batch = items[start:start + per_batch]
      try:
        frames, times = hear_api.get_timestamp_embeddings(np.stack([w for _, w in batch]), model)
      except UserError as e:
        raise UserError(f"{', '.join(str(paths[i]) for i, _ in batch)}: {e}") from None
      for row, (index, _) in enumerate(batch):
        results[index] = (np.asarray(frames[row]), np.asarray(times[row]))
  return results


def output_names(paths: Sequence[str], suffix: str) -> List[str]:
  """Relative output names for audio files: each path relative to the folder all share, its
  extension replaced by `suffix` (kept before it where two files would collide otherwise)."""
  absolute = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in absolute])
  relative = [os.path.relpath(p, root) for p in absolute]
  stems = [os.path.splitext(r)[0] for r in relative]
  counts = collections.Counter(s for s, r in set(zip(stems, relative)))
  return [(s if counts[s] == 1 else r) + suffix for s, r in zip(stems, relative)]


def layout_dirs(output_dir: str, layout: str) -> Dict[str, str]:
  """Layout name -> the folder its task folders go into, for --layout."""
  if layout == "both":
    return {"audiomaepp": output_dir, "heareval": os.path.join(output_dir, "heareval")}
  return {layout: output_dir}


def embed_task(task_dir: str, embedder: Embedder, output_dir: str, layout: str = "audiomaepp",
               batch_seconds: float = 640.0) -> Dict[str, str]:
  """Embeds every split of one HEAR task folder; returns layout -> the task's output folder."""
  task = tasks_lib.read_hear_task(task_dir)
  name = task.name
  complete = {"audiomaepp": tasks_lib.has_task_embeddings,
              "heareval": heareval.has_heareval_embeddings}
  targets = layout_dirs(output_dir, layout)
  pending = {k: d for k, d in targets.items() if not complete[k](d, name)}
  if not pending:
    logging.info("%s: embeddings already complete, skipped", name)
  else:
    duration = task.metadata.get("sample_duration")
    num_samples = int(round(duration * embedder.sample_rate)) if duration else None
    total = sum(len(split.files) for split in task.splits.values())
    embeddings = {}
    with tqdm.tqdm(total=total, desc=name, unit="clip") as progress:
      for split_name, split in task.splits.items():
        embeddings[split_name] = embed_files(split.paths, embedder, num_samples, batch_seconds,
                                             progress)
    if "audiomaepp" in pending:
      tasks_lib.write_task_embeddings(
          pending["audiomaepp"], name, task.metadata, task.vocabulary,
          {s: (embeddings[s], split.labels, split.files) for s, split in task.splits.items()},
          split_files={s: task.task_dir / f"{s}.json" for s in task.splits})
    if "heareval" in pending:
      heareval.write_heareval_embeddings(pending["heareval"], task, embeddings)
  return {k: os.path.join(d, name) for k, d in targets.items()}
