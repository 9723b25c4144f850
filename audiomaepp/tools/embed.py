"""Scene embeddings of HEAR-format tasks (or single files) from a checkpoint or a baseline.

    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --tasks_dir=HEAR_TASKS --output_dir=OUT
    python -m audiomaepp.tools.embed --baseline=logmel_stats --tasks_dir=HEAR_TASKS --output_dir=OUT
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --tasks_dir=HEAR_TASKS \
        --output_dir=OUT --layout=heareval
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --audio=a.wav,b.flac --output_dir=OUT
    python -m audiomaepp.tools.embed --checkpoint=WORKDIR --step=2000 --kind=timestamp \
        --audio=speech/a.wav,music/a.wav --output_dir=OUT

For every task folder (task_metadata.json, labelvocabulary.csv, <split>.json, 16000/<split>/*.wav)
writes per split the scene embeddings and labels under OUT/<task>: --layout=audiomaepp (default)
in this project's layout (`audiomaepp.evaluation.tasks`), --layout=heareval exactly as
hear-eval-kit's embedding runner does (`audiomaepp.evaluation.heareval`), so the kit's predictions
runner runs on it; --layout=both writes the kit's layout under OUT/heareval/<task> as well.
`audiomaepp.tools.evaluate` reads either. A task whose embeddings are complete is skipped, so an
interrupted run resumes where it stopped.

--audio files keep their paths relative to the folder they all share (speech/a.wav ->
OUT/speech/a.npy). --kind=scene (default) writes each file's scene embedding (D,) as `.npy`;
--kind=timestamp the HEAR API's frame embeddings as `.npz` with `embeddings` (frames, D) and
`timestamps_ms` (frames,). --step picks a checkpoint step (default: the newest intact one).
"""
import os

from absl import flags
import numpy as np

from audiomaepp import hear_api
from audiomaepp.errors import UserError
from audiomaepp.evaluation import baselines
from audiomaepp.evaluation import embedding
from audiomaepp.tools import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, imported-original directory or "
                                  "model folder (tools.export --format=native).")
_BASELINE = flags.DEFINE_enum(
    "baseline", None, list(baselines.BASELINES),
    "Embed with a baseline instead of a checkpoint: 'logmel_stats' = per-clip log-mel mean and "
    "std over time.")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "Folder of HEAR 2021 task folders.")
_TASKS = flags.DEFINE_list("tasks", None, "Only these task names (default: all in --tasks_dir).")
_AUDIO = flags.DEFINE_list("audio", None, "Audio files to embed instead of tasks.")
_KIND = flags.DEFINE_enum("kind", "scene", ["scene", "timestamp"],
                          "--audio: scene embeddings (.npy) or frame embeddings with their times "
                          "(.npz).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where embeddings are written.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "audiomaepp", embedding.LAYOUTS, "Task embedding layout: this project's, "
    "hear-eval-kit's, or both (the kit's then under <output_dir>/heareval).")
_FRAME_LAYOUT = flags.DEFINE_enum("frame_layout", "time_major", hear_api.FRAME_LAYOUTS,
                                  "Per-frame regrouping; 'original' reproduces the original code.")
_BATCH_SECONDS = flags.DEFINE_float("batch_seconds", 640.0,
                                    "Audio seconds per HEAR API call (bounds memory).")


def main(argv):
  del argv
  if bool(_CHECKPOINT.value) == bool(_BASELINE.value) or not _OUTPUT_DIR.value:
    raise UserError("pass --output_dir and exactly one of --checkpoint or --baseline")
  if bool(_TASKS_DIR.value) == bool(_AUDIO.value):
    raise UserError("pass exactly one of --tasks_dir or --audio")
  if _KIND.value == "timestamp" and not (_AUDIO.value and _CHECKPOINT.value):
    raise UserError("--kind=timestamp needs --checkpoint and --audio (task folders and baselines "
                    "get scene embeddings)")
  model = None
  if _BASELINE.value:
    embedder = embedding.baseline_embedder(_BASELINE.value)
  else:
    model = hear_api.load_model(_CHECKPOINT.value, frame_layout=_FRAME_LAYOUT.value,
                                step=_STEP.value)
    embedder = embedding.model_embedder(model)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  if _AUDIO.value:
    _embed_audio(_AUDIO.value, embedder, model if _KIND.value == "timestamp" else None)
    return
  names = sorted(n for n in os.listdir(_TASKS_DIR.value)
                 if os.path.isfile(os.path.join(_TASKS_DIR.value, n, "task_metadata.json")))
  if _TASKS.value:
    names = [n for n in names if n in _TASKS.value or n.rsplit("-v", 1)[0] in _TASKS.value]
  if not names:
    raise UserError(f"no HEAR task folders (with task_metadata.json) in {_TASKS_DIR.value}")
  for name in names:
    outs = embedding.embed_task(os.path.join(_TASKS_DIR.value, name), embedder,
                                _OUTPUT_DIR.value, _LAYOUT.value, _BATCH_SECONDS.value)
    print(f"{name}: embeddings in {', '.join(outs.values())}")


def _embed_audio(paths, embedder, timestamp_model=None):
  """Writes each file's embeddings under --output_dir, keeping relative paths: scene embeddings
  of `embedder`, or frame embeddings of `timestamp_model` when given."""
  timestamp = timestamp_model is not None
  names = embedding.output_names(paths, ".npz" if timestamp else ".npy")
  if timestamp:
    results = embedding.timestamp_embeddings(paths, timestamp_model, _BATCH_SECONDS.value)
  else:
    results = embedding.embed_files(paths, embedder, batch_seconds=_BATCH_SECONDS.value)
  for path, name, result in zip(paths, names, results):
    out = os.path.join(_OUTPUT_DIR.value, name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if timestamp:
      frames, times = result
      np.savez(out, embeddings=frames, timestamps_ms=times)
      print(f"{path} -> {out} ({frames.shape[0]} frames x {frames.shape[1]} values)")
    else:
      np.save(out, result)
      print(f"{path} -> {out} ({result.shape[0]} values)")


if __name__ == "__main__":
  cli.run(main)
