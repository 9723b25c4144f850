"""The drums task on real drum-kit recordings: instrument classes, kit splits, the HEAR folder."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from audiomaepp.errors import UserError
from audiomaepp.evaluation import drums
from audiomaepp.evaluation import tasks

_KIT_XML = """<?xml version="1.0" encoding="UTF-8"?>
<drumkit_info xmlns="http://www.hydrogen-music.org/drumkit">
 <name>{name}</name>
 <instrumentList>{instruments}</instrumentList>
</drumkit_info>"""
_INSTRUMENT = ("<instrument><id>{i}</id><name>{name}</name>"
               "<instrumentComponent>{layers}</instrumentComponent></instrument>")
_LAYER = "<layer><filename>{file}</filename></layer>"


@pytest.mark.parametrize("name, expected", [
    ("Kick", "kick"), ("BassDrum", "kick"), ("c3 - bass drum 1", "kick"),
    ('Kick (Tama Superstar 22")', "kick"), ("Snare Rock", "snare"),
    ("Pearl Snare Rimshot", "snare"), ("Closed HH", "hihat"), ("Hi-Hat Open (Paiste)", "hihat"),
    ("Sabian Hat Choke", "hihat"), ("f#3 - hi-hat closed", "hihat"), ("Tom Hi", "tom"),
    ("Pearl Tom Floor", "tom"), ("Crash/Ride Bell (Paiste)", "cymbal"), ("Ride Jazz", "cymbal"),
    ("China (Paiste Alpha 18\")", "cymbal"), ("Zildjian Splash Choke", "cymbal"),
    ("d#4 - cymbal 1", "cymbal"), ("Hand Clap", None), ("Cowbell", None), ("Stick", None),
    ("Tambourine (Pearl)", None), ("Djembe1 Slap", None), ("Bottom", None),
])
def test_instrument_names_map_to_drum_classes(name, expected):
  assert drums.drum_class(name) == expected


def test_kits_split_disjointly_and_deterministically():
  kits = [f"kit{i:02d}" for i in range(12)]
  splits = drums.kit_splits(kits, seed=0)
  assert sorted(sum(splits.values(), [])) == kits
  assert [len(splits[s]) for s in drums.SPLITS] == [8, 2, 2]
  assert splits == drums.kit_splits(kits, seed=0)
  assert splits != drums.kit_splits(kits, seed=1)
  assert all(drums.kit_splits(kits[:3], seed=s)[split] for s in range(5) for split in drums.SPLITS)


def _write_kit(kits_dir, name, instruments, rng):
  """A kit folder: drumkit.xml and one short wav per layer; returns {file: (class, waveform)}."""
  kit_dir = os.path.join(kits_dir, name)
  os.makedirs(kit_dir)
  written, xml = {}, []
  for i, (instrument, layers) in enumerate(instruments):
    files = []
    for layer in range(layers):
      file = f"{instrument.replace(' ', '_')}_{layer}.wav"
      waveform = rng.uniform(-0.9, 0.9, int(0.3 * drums.SAMPLE_RATE)).astype(np.float32)
      sf.write(os.path.join(kit_dir, file), waveform, drums.SAMPLE_RATE, subtype="FLOAT")
      files.append(_LAYER.format(file=file))
      written[file] = (drums.drum_class(instrument), waveform)
    xml.append(_INSTRUMENT.format(i=i, name=instrument, layers="".join(files)))
  with open(os.path.join(kit_dir, "drumkit.xml"), "w") as f:
    f.write(_KIT_XML.format(name=name, instruments="".join(xml)))
  return written


def test_write_task_makes_a_hear_folder_with_whole_kits_per_split(tmp_path):
  rng = np.random.default_rng(0)
  kits_dir = str(tmp_path / "kits")
  layout = [("Kick", 2), ("Snare", 1), ("Closed HH", 2), ("Tom Mid", 1), ("Crash", 1),
            ("Hand Clap", 1)]
  kits = {f"kit{k}": _write_kit(kits_dir, f"kit{k}", layout, rng) for k in range(5)}
  os.makedirs(os.path.join(kits_dir, "not_a_kit"))
  samples = [(kit, label, wave) for kit, files in kits.items() for label, wave in files.values()]

  task_dir = drums.write_task(str(tmp_path / "tasks"), seed=0, kits_dir=kits_dir)
  task = tasks.read_hear_task(task_dir)

  assert task.vocabulary == list(drums.CLASSES)
  assert task.metadata["prediction_type"] == "multiclass"
  assert {s: len(task.splits[s].files) for s in drums.SPLITS} == {"train": 21, "valid": 7, "test": 7}
  kits_of = {}
  for split in drums.SPLITS:
    for path, labels in zip(task.splits[split].paths, task.splits[split].labels):
      clip, rate = sf.read(path, dtype="float32")
      assert rate == drums.SAMPLE_RATE and len(clip) == drums.DURATION_S * drums.SAMPLE_RATE
      sound = np.flatnonzero(clip)
      # The sample it holds: the nearest of the (independent random) samples written.
      kit, label, wave = min(samples, key=lambda s: np.abs(clip[sound[0]:][:len(s[2])] - s[2]).max())
      np.testing.assert_allclose(clip[sound[0]:sound[0] + len(wave)], wave, atol=1e-4)
      assert labels == [label]
      # centred: as much silence before the sample as after it (within a sample or two)
      assert abs(sound[0] - (len(clip) - sound[0] - len(wave))) <= 2
      kits_of.setdefault(split, set()).add(kit)
  assert sorted(sum(map(list, kits_of.values()), [])) == sorted(kits)  # each kit in one split


def test_missing_kits_name_the_package(tmp_path):
  with pytest.raises(UserError, match="apt-get install -y hydrogen-drumkits"):
    drums.write_task(str(tmp_path), kits_dir=str(tmp_path / "none"))


def test_fit_clip_centres_or_cuts():
  np.testing.assert_array_equal(drums.fit_clip(np.ones(3, np.float32), 7), [0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(drums.fit_clip(np.arange(9.0), 4), [0, 1, 2, 3])


def test_command_line_writes_the_task_or_names_the_package(tmp_path):
  kits_dir = str(tmp_path / "kits")
  for k in range(3):
    _write_kit(kits_dir, f"kit{k}", [("Kick", 1), ("Snare", 1)], np.random.default_rng(k))
  command = [sys.executable, "-m", "audiomaepp.tools.drums_task", f"--output_dir={tmp_path}/t"]
  done = subprocess.run([*command, f"--kits_dir={kits_dir}"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == (f"wrote {tmp_path}/t/drums-v1: train 2 clips, valid 2 clips, "
                                 "test 2 clips")
  missing = subprocess.run([*command, f"--kits_dir={tmp_path}/none"], capture_output=True,
                           text=True)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f"error: the drums task needs the Debian package hydrogen-drumkits ({tmp_path}/none is "
      "missing): install it with `apt-get install -y hydrogen-drumkits`"]
