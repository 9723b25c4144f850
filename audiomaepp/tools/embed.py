"""Scene embeddings of HEAR-format tasks (or single files) from a checkpoint or a baseline.

    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --tasks_dir=HEAR_TASKS --output_dir=OUT
    python -m audiomaepp.tools.embed --baseline=logmel_stats --tasks_dir=HEAR_TASKS --output_dir=OUT
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --tasks_dir=HEAR_TASKS \
        --output_dir=OUT --layout=heareval
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --audio=a.wav,b.flac --output_dir=OUT

For every task folder (task_metadata.json, labelvocabulary.csv, <split>.json, 16000/<split>/*.wav)
writes per split the scene embeddings and labels under OUT/<task>: --layout=audiomaepp (default)
in this project's layout (`audiomaepp.evaluation.tasks`), --layout=heareval exactly as
hear-eval-kit's embedding runner does (`audiomaepp.evaluation.heareval`), so the kit's predictions
runner runs on it; --layout=both writes the kit's layout under OUT/heareval/<task> as well.
`audiomaepp.tools.evaluate` reads either. A task whose embeddings are complete is skipped, so an
interrupted run resumes where it stopped.
"""
import collections
import dataclasses
import os
from typing import Callable, Dict, List, Sequence

from absl import flags
from absl import logging
import numpy as np
import tqdm

from audiomaepp import audio as audio_lib
from audiomaepp import hear_api
from audiomaepp.errors import UserError
from audiomaepp.evaluation import baselines
from audiomaepp.evaluation import heareval
from audiomaepp.evaluation import tasks as tasks_lib
from audiomaepp.tools import cli

LAYOUTS = ("audiomaepp", "heareval", "both")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or imported-original directory.")
_BASELINE = flags.DEFINE_enum(
    "baseline", None, list(baselines.BASELINES),
    "Embed with a baseline instead of a checkpoint: 'logmel_stats' = per-clip log-mel mean and "
    "std over time.")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "Folder of HEAR 2021 task folders.")
_TASKS = flags.DEFINE_list("tasks", None, "Only these task names (default: all in --tasks_dir).")
_AUDIO = flags.DEFINE_list("audio", None, "Audio files to embed instead of tasks.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where embeddings are written.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "audiomaepp", LAYOUTS, "Task embedding layout: this project's, hear-eval-kit's, "
    "or both (the kit's then under <output_dir>/heareval).")
_FRAME_LAYOUT = flags.DEFINE_enum("frame_layout", "time_major", hear_api.FRAME_LAYOUTS,
                                  "Per-frame regrouping; 'original' reproduces the original code.")
_BATCH_SECONDS = flags.DEFINE_float("batch_seconds", 640.0,
                                    "Audio seconds per HEAR API call (bounds memory).")


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


def _fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
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
      waveform = _fit_length(waveform, num_samples)
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


def main(argv):
  del argv
  if bool(_CHECKPOINT.value) == bool(_BASELINE.value) or not _OUTPUT_DIR.value:
    raise UserError("pass --output_dir and exactly one of --checkpoint or --baseline")
  if bool(_TASKS_DIR.value) == bool(_AUDIO.value):
    raise UserError("pass exactly one of --tasks_dir or --audio")
  if _BASELINE.value:
    embedder = baseline_embedder(_BASELINE.value)
  else:
    embedder = model_embedder(
        hear_api.load_model(_CHECKPOINT.value, frame_layout=_FRAME_LAYOUT.value))
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  if _AUDIO.value:
    embeddings = embed_files(_AUDIO.value, embedder, batch_seconds=_BATCH_SECONDS.value)
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
    outs = embed_task(os.path.join(_TASKS_DIR.value, name), embedder, _OUTPUT_DIR.value,
                      _LAYOUT.value, _BATCH_SECONDS.value)
    print(f"{name}: embeddings in {', '.join(outs.values())}")


if __name__ == "__main__":
  cli.run(main)
