"""Scene embeddings of HEAR-format tasks (or single files) from a checkpoint.

    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --tasks_dir=HEAR_TASKS --output_dir=OUT
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --audio=a.wav,b.flac --output_dir=OUT

For every task folder (task_metadata.json, labelvocabulary.csv, <split>.json, 16000/<split>/*.wav)
writes per split the scene embeddings, labels and file names under OUT/<task> (the layout that
`audiomaepp.tools.evaluate` reads). A task whose embeddings are complete is skipped, so an
interrupted run resumes where it stopped.
"""
import collections
import os
from typing import Dict, List, Sequence

from absl import flags
from absl import logging
import numpy as np
import tqdm

from audiomaepp import audio as audio_lib
from audiomaepp import hear_api
from audiomaepp.errors import UserError
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.tools import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or imported-original directory.")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "Folder of HEAR 2021 task folders.")
_TASKS = flags.DEFINE_list("tasks", None, "Only these task names (default: all in --tasks_dir).")
_AUDIO = flags.DEFINE_list("audio", None, "Audio files to embed instead of tasks.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where embeddings are written.")
_FRAME_LAYOUT = flags.DEFINE_enum("frame_layout", "time_major", hear_api.FRAME_LAYOUTS,
                                  "Per-frame regrouping; 'original' reproduces the original code.")
_BATCH_SECONDS = flags.DEFINE_float("batch_seconds", 640.0,
                                    "Audio seconds per HEAR API call (bounds memory).")


def _fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
  """Zero-pads or trims to the task's clip length, as HEAR's evaluation kit does."""
  if waveform.shape[0] >= num_samples:
    return waveform[:num_samples]
  return np.pad(waveform, (0, num_samples - waveform.shape[0]))


def embed_files(paths: Sequence[str], model: hear_api.Model, num_samples: int | None = None,
                batch_seconds: float = 640.0, progress: tqdm.tqdm | None = None) -> np.ndarray:
  """Scene embeddings (len(paths), D) of audio files, batching clips of equal length."""
  waveforms = {}
  by_length: Dict[int, List[int]] = collections.defaultdict(list)
  for index, path in enumerate(paths):
    waveform = audio_lib.load_audio(path)
    if num_samples:
      waveform = _fit_length(waveform, num_samples)
    waveforms[index] = waveform
    by_length[waveform.shape[0]].append(index)
  embeddings = np.zeros((len(paths), model.scene_embedding_size), np.float32)
  for length, indices in by_length.items():
    per_batch = max(1, int(batch_seconds * model.sample_rate) // length)
    for start in range(0, len(indices), per_batch):
      batch = indices[start:start + per_batch]
      audio = np.stack([waveforms.pop(i) for i in batch])
      try:
        embeddings[batch] = np.asarray(hear_api.get_scene_embeddings(audio, model))
      except UserError as e:  # its "sounds [i]" count within this batch of files
        names = [str(paths[i]) for i in batch]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{listed}: {e}") from None
      if progress is not None:
        progress.update(len(batch))
  return embeddings


def embed_task(task_dir: str, model: hear_api.Model, output_dir: str,
               batch_seconds: float = 640.0) -> str:
  """Embeds every split of one HEAR task folder into `output_dir/<task>`; returns that folder."""
  task = tasks_lib.read_hear_task(task_dir)
  name = task.name
  if tasks_lib.has_task_embeddings(output_dir, name):
    logging.info("%s: embeddings already complete, skipped", name)
    return os.path.join(output_dir, name)
  duration = task.metadata.get("sample_duration")
  num_samples = int(round(duration * model.sample_rate)) if duration else None
  total = sum(len(split.files) for split in task.splits.values())
  splits = {}
  with tqdm.tqdm(total=total, desc=name, unit="clip") as progress:
    for split_name, split in task.splits.items():
      embeddings = embed_files(split.paths, model, num_samples, batch_seconds, progress)
      splits[split_name] = (embeddings, split.labels, split.files)
  return tasks_lib.write_task_embeddings(output_dir, name, task.metadata, task.vocabulary, splits)


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUTPUT_DIR.value:
    raise UserError("--checkpoint and --output_dir are required")
  if bool(_TASKS_DIR.value) == bool(_AUDIO.value):
    raise UserError("pass exactly one of --tasks_dir or --audio")
  model = hear_api.load_model(_CHECKPOINT.value, frame_layout=_FRAME_LAYOUT.value)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  if _AUDIO.value:
    embeddings = embed_files(_AUDIO.value, model, batch_seconds=_BATCH_SECONDS.value)
    for path, embedding in zip(_AUDIO.value, embeddings):
      out = os.path.join(_OUTPUT_DIR.value, os.path.splitext(os.path.basename(path))[0] + ".npy")
      np.save(out, embedding)
      print(f"{path} -> {out} ({embedding.shape[0]} values)")
    return
  names = sorted(n for n in os.listdir(_TASKS_DIR.value)
                 if os.path.isfile(os.path.join(_TASKS_DIR.value, n, "task_metadata.json")))
  if _TASKS.value:
    names = [n for n in names if n in _TASKS.value or n.rsplit("-v", 1)[0] in _TASKS.value]
  if not names:
    raise UserError(f"no HEAR task folders (with task_metadata.json) in {_TASKS_DIR.value}")
  for name in names:
    out = embed_task(os.path.join(_TASKS_DIR.value, name), model, _OUTPUT_DIR.value,
                     _BATCH_SECONDS.value)
    print(f"{name}: embeddings in {out}")


if __name__ == "__main__":
  cli.run(main)
