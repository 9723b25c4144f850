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
import os
import re
import xml.etree.ElementTree as ElementTree
from typing import Optional

from audiomaepp import audio
from audiomaepp.errors import UserError
from audiomaepp.evaluation import hear_writer
from audiomaepp.evaluation.hear_writer import SPLITS, fit_clip
from audiomaepp.evaluation.tasks import SAMPLE_RATE

KITS_DIR = "/usr/share/hydrogen/data/drumkits"
PACKAGE = "hydrogen-drumkits"
NAME = "drums"
CLASSES = ("hihat", "cymbal", "kick", "snare", "tom")
DURATION_S = 2.0
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


# Whole kits are the split units.
kit_splits = hear_writer.split_units


def write_task(out_dir: str, seed: int = 0, kits_dir: str = KITS_DIR) -> str:
  """Writes `out_dir/drums-v1` in the HEAR layout; returns its path."""
  if not os.path.isdir(kits_dir):
    raise UserError(f"the drums task needs the Debian package {PACKAGE} ({kits_dir} is missing): "
                    f"install it with `apt-get install -y {PACKAGE}`")
  kits = {name: kit_samples(os.path.join(kits_dir, name)) for name in sorted(os.listdir(kits_dir))
          if os.path.isfile(os.path.join(kits_dir, name, "drumkit.xml"))}
  kits = {name: samples for name, samples in kits.items() if samples}
  num_samples = int(DURATION_S * SAMPLE_RATE)
  clips = ((split, fit_clip(audio.load_audio(path), num_samples), label)
           for split, split_kits in kit_splits(sorted(kits), seed).items()
           for kit in split_kits for path, label in kits[kit])
  return hear_writer.write_hear_task(
      out_dir, NAME, clips, CLASSES, DURATION_S,
      f"drum type ({', '.join(CLASSES)}) of real drum-kit samples from {PACKAGE}, kits disjoint "
      "across splits")
