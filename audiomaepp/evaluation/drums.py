"""A HEAR task on real recordings: which drum was hit, with the drum kits disjoint across splits.

The recordings are the one-shot samples of the drum kits in Debian's `hydrogen-drumkits`
(recorded acoustic kits and sampled electronic ones; licences in docs/data.md). Each kit's
`drumkit.xml` names its instruments; an instrument is one of `CLASSES` by its name (hi-hats
before cymbals before kicks, snares and toms; hand percussion, claps and effects are left out),
and every sample layer (velocity) of it is one clip, centred in `DURATION_S` of silence or cut
to it. Whole kits go to one split (about 60/20/20 of the kits, by a seeded permutation), so the
task measures whether a drum is recognised on a kit never heard in training.
`benchmarks/study.py` writes it beside the synthetic tasks (`write_task(TASKS_DIR)`).
"""
import json
import os
import re
import shutil
import xml.etree.ElementTree as ElementTree
from typing import Optional

import numpy as np
import soundfile as sf

from audiomaepp import audio
from audiomaepp.errors import UserError
from audiomaepp.evaluation.tasks import SAMPLE_RATE

KITS_DIR = "/usr/share/hydrogen/data/drumkits"
PACKAGE = "hydrogen-drumkits"
NAME = "drums"
CLASSES = ("hihat", "cymbal", "kick", "snare", "tom")
DURATION_S = 2.0
SPLITS = ("train", "valid", "test")
# Instrument-name patterns, tried in CLASSES order ('Ride Bell' is a cymbal, 'Hi-Hat' no tom).
_PATTERNS = {
    "hihat": r"\bhh\b|hat",
    "cymbal": r"crash|ride|cymbal|china|splash",
    "kick": r"kick|bass ?drum",
    "snare": r"snare",
    "tom": r"\btom",
}


def drum_class(instrument: str) -> Optional[str]:
  """The class of a kit instrument by its name, or None for anything else."""
  name = instrument.lower()
  return next((c for c in CLASSES if re.search(_PATTERNS[c], name)), None)


def kit_samples(kit_dir: str) -> list[tuple[str, str]]:
  """(sample path, class) of every layer of the kit's drum instruments, in file order."""
  root = ElementTree.parse(os.path.join(kit_dir, "drumkit.xml")).getroot()
  namespace = re.match(r"\{.*\}", root.tag)
  ns = namespace.group(0) if namespace else ""
  samples = []
  for instrument in root.iter(ns + "instrument"):
    name = instrument.findtext(ns + "name") or ""
    label = drum_class(name)
    if label is None:
      continue
    for filename in instrument.iter(ns + "filename"):
      path = os.path.join(kit_dir, filename.text or "")
      if filename.text and os.path.isfile(path):
        samples.append((path, label))
  return samples


def kit_splits(kits: list[str], seed: int) -> dict[str, list[str]]:
  """Kits (sorted names) to splits: a seeded permutation cut 60/20/20, at least one per split."""
  order = [kits[i] for i in np.random.default_rng([seed, 2]).permutation(len(kits))]
  num_valid = num_test = max(1, round(0.2 * len(kits)))
  return {"valid": sorted(order[:num_valid]), "test": sorted(order[num_valid:num_valid + num_test]),
          "train": sorted(order[num_valid + num_test:])}


def fit_clip(waveform: np.ndarray, num_samples: int) -> np.ndarray:
  """`waveform` centred in `num_samples` of silence, or its first `num_samples`."""
  if len(waveform) >= num_samples:
    return waveform[:num_samples]
  start = (num_samples - len(waveform)) // 2
  return np.pad(waveform, (start, num_samples - len(waveform) - start))


def write_task(out_dir: str, seed: int = 0, kits_dir: str = KITS_DIR) -> str:
  """Writes `out_dir/drums-v1` in the HEAR layout; returns its path."""
  if not os.path.isdir(kits_dir):
    raise UserError(f"the drums task needs the Debian package {PACKAGE} ({kits_dir} is missing): "
                    f"install it with `apt-get install -y {PACKAGE}`")
  kits = {name: kit_samples(os.path.join(kits_dir, name)) for name in sorted(os.listdir(kits_dir))
          if os.path.isfile(os.path.join(kits_dir, name, "drumkit.xml"))}
  kits = {name: samples for name, samples in kits.items() if samples}
  task_dir = os.path.join(out_dir, f"{NAME}-v1")
  shutil.rmtree(task_dir, ignore_errors=True)
  index = {}
  num_samples = int(DURATION_S * SAMPLE_RATE)
  for split, split_kits in kit_splits(sorted(kits), seed).items():
    os.makedirs(os.path.join(task_dir, str(SAMPLE_RATE), split))
    index[split] = {}
    for kit in split_kits:
      for path, label in kits[kit]:
        name = f"{len(index[split]):05d}.wav"
        clip = fit_clip(audio.load_audio(path), num_samples)
        sf.write(os.path.join(task_dir, str(SAMPLE_RATE), split, name), clip,
                 SAMPLE_RATE, subtype="PCM_16")
        index[split][name] = [label]
  for split in SPLITS:
    with open(os.path.join(task_dir, f"{split}.json"), "w") as f:
      json.dump(index[split], f, indent=1)
  with open(os.path.join(task_dir, "labelvocabulary.csv"), "w") as f:
    f.write("idx,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(CLASSES)))
  metadata = {"task_name": NAME, "version": "v1", "embedding_type": "scene",
              "prediction_type": "multiclass", "split_mode": "trainvaltest", "splits": list(SPLITS),
              "sample_duration": DURATION_S, "evaluation": ["top1_acc"],
              "description": f"drum type ({', '.join(CLASSES)}) of real drum-kit samples from "
                             f"{PACKAGE}, kits disjoint across splits"}
  with open(os.path.join(task_dir, "task_metadata.json"), "w") as f:  # last: marks a whole task
    json.dump(metadata, f, indent=2)
  return task_dir
