"""Writing HEAR task folders from labelled clips: the seeded split and the folder layout.

The real-recording tasks (`drums`, `packaged_tasks`) share these: sources (a kit, a prompt, a
recording) go to one split each by `split_units`, clips are centred or cut by `fit_clip`, and
`write_hear_task` writes `<out_dir>/<name>-v1/` (layout in `tasks`) with `task_metadata.json`
last, so its presence marks a whole task.
"""
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
import soundfile as sf

from audiomaepp.evaluation.tasks import SAMPLE_RATE

SPLITS = ("train", "valid", "test")


def split_units(units: Sequence[str], seed: int) -> dict[str, list[str]]:
  """Units (sorted names) to splits: a seeded permutation cut 60/20/20, at least one per split."""
  order = [units[i] for i in np.random.default_rng([seed, 2]).permutation(len(units))]
  num_valid = num_test = max(1, round(0.2 * len(units)))
  return {"valid": sorted(order[:num_valid]), "test": sorted(order[num_valid:num_valid + num_test]),
          "train": sorted(order[num_valid + num_test:])}


def fit_clip(waveform: np.ndarray, num_samples: int) -> np.ndarray:
  """`waveform` centred in `num_samples` of silence, or its first `num_samples`."""
  if len(waveform) >= num_samples:
    return waveform[:num_samples]
  start = (num_samples - len(waveform)) // 2
  return np.pad(waveform, (start, num_samples - len(waveform) - start))


def write_hear_task(out_dir: str, name: str, clips: Iterable[tuple[str, np.ndarray, str]],
                    vocabulary: Sequence[str], duration_s: float, description: str) -> str:
  """Writes `out_dir/<name>-v1` from (split, 16 kHz clip, label) triples; returns its path.

  Clips are numbered in the order given within each split; a previous folder is replaced.
  """
  task_dir = os.path.join(out_dir, f"{name}-v1")
  shutil.rmtree(task_dir, ignore_errors=True)
  for split in SPLITS:
    os.makedirs(os.path.join(task_dir, str(SAMPLE_RATE), split))
  index = {split: {} for split in SPLITS}
  for split, clip, label in clips:
    file = f"{len(index[split]):05d}.wav"
    sf.write(os.path.join(task_dir, str(SAMPLE_RATE), split, file), clip, SAMPLE_RATE,
             subtype="PCM_16")
    index[split][file] = [label]
  for split in SPLITS:
    with open(os.path.join(task_dir, f"{split}.json"), "w") as f:
      json.dump(index[split], f, indent=1)
  with open(os.path.join(task_dir, "labelvocabulary.csv"), "w") as f:
    f.write("idx,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(vocabulary)))
  metadata = {"task_name": name, "version": "v1", "embedding_type": "scene",
              "prediction_type": "multiclass", "split_mode": "trainvaltest", "splits": list(SPLITS),
              "sample_duration": duration_s, "evaluation": ["top1_acc"],
              "description": description}
  with open(os.path.join(task_dir, "task_metadata.json"), "w") as f:  # last: marks a whole task
    json.dump(metadata, f, indent=2)
  return task_dir
