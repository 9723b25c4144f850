"""The packaged-recording tasks on fake package folders: labels, splits, clips, HEAR folders."""
import dataclasses
import os

import numpy as np
import pytest
import soundfile as sf

from audiomaepp.data import real
from audiomaepp.errors import UserError
from audiomaepp.evaluation import drums
from audiomaepp.evaluation import packaged_tasks as pt
from audiomaepp.evaluation import tasks

RATE = pt.SAMPLE_RATE
_PROMPTS = [f"p{i:02d}" for i in range(15)]


def _write(path, waveform, rate=RATE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith(".gsm"):
    sf.write(path, waveform, rate, format="RAW", subtype="GSM610")
  else:
    sf.write(path, waveform, rate)


def _tone(freq, seconds, rate=RATE):
  t = np.arange(int(seconds * rate)) / rate
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speech_tree(root):
  """Every speech source with the same prompts; each speaker a tone; returns {label: Hz}."""
  tones = {label: 300.0 * (i + 1) for i, label in enumerate(pt.SPEAKER_ID.classes)}
  fillets, tux, asterisk = (os.path.join(root, f.lstrip("/")) for f in
                            (pt._FILLETS, pt._TUXPAINT, pt._ASTERISK))
  for prompt in _PROMPTS:
    for lang in ("cs", "nl"):
      for fish, code in (("big", "v"), ("small", "m")):
        _write(f"{fillets}/level/{lang}/lv-{code}-{prompt}.ogg",
               _tone(tones[f"{lang}-{fish}-fish"], 2))
    for lang in ("es", "fr", "ru"):
      _write(f"{tux}/animals/{prompt}_desc_{lang}.ogg", _tone(tones[f"{lang}-tuxpaint"], 2))
    def tone(lang):
      return _tone(tones[f"{lang}-asterisk"], 4, 8000)
    _write(f"{asterisk}/es/digits/{prompt}.gsm", tone("es"), 8000)
    _write(f"{asterisk}/fr/{prompt}.gsm", tone("fr"), 8000)
    _write(f"{asterisk}/ru_RU_f_IvrvoiceRU/{prompt}.wav", tone("ru"), 8000)
  _write(f"{asterisk}/ru_RU_f_IvrvoiceRU/silence/1.wav", np.zeros(8000, np.float32), 8000)
  _write(f"{asterisk}/es/beep.gsm", _tone(1000, 1, 8000), 8000)
  return tones


def _touch(root, folder, rel):
  path = os.path.join(root, folder.lstrip("/"), rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "w").close()


_SOUNDS = [
    (pt._TUXPAINT, "animals/birds/crow.ogg", ("bird", "animals/birds/crow")),
    (pt._TUXPAINT, "animals/birds/crow_desc_fr.ogg", None),
    (pt._TUXPAINT, "animals/mammals/bovines/cow_white.ogg",
     ("farm_animal", "animals/mammals/bovines/cow_white")),
    (pt._TUXPAINT, "animals/mammals/pig_golden2.ogg",
     ("farm_animal", "animals/mammals/pig_golden")),
    (pt._TUXPAINT, "animals/mammals/cats/lion.ogg", ("dog_cat", "animals/mammals/cats/lion")),
    (pt._TUXPAINT, "seasonal/halloween/blackcat.ogg", ("dog_cat", "seasonal/halloween/blackcat")),
    (pt._TUXPAINT, "animals/mammals/giraffe.ogg", ("wild_mammal", "animals/mammals/giraffe")),
    (pt._TUXPAINT, "household/tools/saw.ogg", ("tool", "household/tools/saw")),
    (pt._TUXPAINT, "symbols/math/7.ogg", None),
    (pt._SCRATCH, "Animal/Dog1.wav", ("dog_cat", "Animal/Dog")),
    (pt._SCRATCH, "Animal/Duck.wav", ("bird", "Animal/Duck")),
    (pt._SCRATCH, "Human/Laugh-male2.wav", ("human_vocal", "Human/Laugh-male")),
    (pt._SCRATCH, "Effects/WaterDrop.mp3", ("water", "Effects/WaterDrop")),
    (pt._SCRATCH, "Instruments/Chord.wav", None),
    (pt._MINETEST, "default/sounds/default_grass_footstep.3.ogg",
     ("footsteps", "default/sounds/default_grass_footstep")),
    (pt._MINETEST, "doors/sounds/doors_door_open.ogg", ("door", "doors/sounds/doors_door_open")),
    (pt._MINETEST, "fire/sounds/fire_fire.2.ogg", ("fire", "fire/sounds/fire_fire")),
    (pt._MINETEST, "fire/sounds/fire_flint_and_steel.ogg", None),
    (pt._LINCITY, "Fire2.wav", ("fire", "Fire")),
    (pt._LINCITY, "FireStation1.wav", None),
    (pt._LINCITY, "TraficLow3.wav", ("vehicle", "TraficLow")),
    (pt._LINCITY, "Mill2.wav", ("machine", "Mill")),
]


def test_sound_files_map_to_classes_and_recordings(tmp_path):
  for folder, rel, _ in _SOUNDS:
    _touch(tmp_path, folder, rel)
  found = {os.path.relpath(r.path, str(tmp_path)): (r.label, r.unit)
           for r in pt.recordings(pt.ENV_SOUNDS, root=str(tmp_path))}
  expected = {os.path.join(folder.lstrip("/"), rel): want for folder, rel, want in _SOUNDS if want}
  assert found == expected


def test_speech_files_map_to_speakers_languages_and_prompts(tmp_path):
  tones = _speech_tree(str(tmp_path))
  _touch(tmp_path, pt._FILLETS, "gods/cs/b1-1.ogg")  # a god, not a fish: Czech, no speaker
  speakers = pt.recordings(pt.SPEAKER_ID, root=str(tmp_path))
  languages = pt.recordings(pt.LANGUAGE_ID, root=str(tmp_path))
  assert sorted({r.label for r in speakers}) == sorted(tones)
  assert {r.unit for r in speakers} == {f"lv-{c}-{p}" for c in "vm" for p in _PROMPTS} | set(
      f"animals/{p}" for p in _PROMPTS) | {f"digits/{p}" for p in _PROMPTS} | set(_PROMPTS)
  assert len(speakers) == 10 * len(_PROMPTS)  # no silence, beep or god
  assert len(languages) == len(speakers) + 1
  by_path = {r.path: r.label for r in languages}
  assert all(by_path[r.path] == r.label[:2] for r in speakers)


def test_prompts_and_recordings_stay_in_one_split(tmp_path):
  _speech_tree(str(tmp_path))
  found = pt.recordings(pt.LANGUAGE_ID, root=str(tmp_path))
  splits = pt.unit_splits(pt.LANGUAGE_ID, found, seed=0)
  by_unit = {}
  for (label, unit), split in splits.items():
    by_unit.setdefault(unit, set()).add(split)
  assert all(len(s) == 1 for s in by_unit.values())  # one prompt, every language: one split
  assert splits == pt.unit_splits(pt.LANGUAGE_ID, found, seed=0)
  assert splits != pt.unit_splits(pt.LANGUAGE_ID, found, seed=1)
  # Sounds split within each class: every class with three recordings reaches every split.
  sounds = [pt.Recording(f"/{c}/{u}", c, u, 0) for c in "abc" for u in ("x1", "x2", "x3")]
  sound_splits = pt.unit_splits(pt.ENV_SOUNDS, sounds, seed=0)
  assert {(c, s) for (c, _), s in sound_splits.items()} == {(c, s) for c in "abc"
                                                            for s in pt.SPLITS}


def test_windows_trim_cut_centre_and_band_limit():
  env = pt.ENV_SOUNDS
  sound = _tone(440, 5.5)
  clips = pt.windows(env, np.concatenate([np.zeros(RATE, np.float32), sound, np.zeros(RATE)]))
  size = int(env.duration_s * RATE)
  assert len(clips) == 4 and all(len(c) == size for c in clips)  # 2 s windows 1 s apart in 5.5 s
  np.testing.assert_allclose(clips[1][:RATE], clips[0][RATE:], atol=1e-6)
  assert abs(np.abs(clips[0]).max() - 0.9) < 1e-3  # peak-normalised
  short = pt.windows(env, np.concatenate([np.zeros(RATE), _tone(440, 0.5), np.zeros(RATE)]))
  assert len(short) == 1 and abs(np.flatnonzero(short[0])[0] - (size - RATE // 2) // 2) <= 2
  assert pt.windows(env, _tone(440, 0.1)) == [] and pt.windows(env, np.zeros(RATE)) == []
  speech = pt.windows(pt.LANGUAGE_ID, _tone(1000, 4) + _tone(6000, 4))
  spectrum = np.abs(np.fft.rfft(speech[0]))
  hz = np.fft.rfftfreq(len(speech[0]), 1 / RATE)
  assert spectrum[hz > 4500].max() < 0.01 * spectrum.max()  # band-limited to 4 kHz


@pytest.mark.parametrize("name", ["speaker_id", "language_id"])
def test_write_task_makes_a_hear_folder(tmp_path, name):
  tones = _speech_tree(str(tmp_path / "root"))
  task_dir = pt.write_task(name, str(tmp_path / "tasks"), root=str(tmp_path / "root"))
  task = tasks.read_hear_task(task_dir)
  spec = pt.TASKS[name]
  assert task.vocabulary == list(spec.classes)
  assert task.metadata["sample_duration"] == spec.duration_s
  assert sorted(os.listdir(task.task_dir)) == ["16000", "labelvocabulary.csv", "task_metadata.json",
                                               "test.json", "train.json", "valid.json"]
  for split in pt.SPLITS:
    labels = {row[0] for row in task.splits[split].labels}
    assert labels == set(spec.classes)  # every class in every split
    for path, (label,) in zip(task.splits[split].paths, task.splits[split].labels):
      clip, rate = sf.read(path, dtype="float32")
      assert rate == RATE and len(clip) == spec.duration_s * RATE
      assert 0.5 < np.abs(clip).max() < 0.91  # peak-normalised recordings
      if name == "speaker_id":  # the speaker's tone: the clip came from that speaker's file
        hz = np.fft.rfftfreq(len(clip), 1 / RATE)[np.abs(np.fft.rfft(clip)).argmax()]
        assert abs(hz - tones[label]) < 20


def test_missing_packages_are_named(tmp_path):
  with pytest.raises(UserError, match=r"needs the Debian packages fillets-ng-data-cs .*"
                     r"apt-get install -y --no-install-recommends fillets-ng-data-cs"):
    pt.write_task("speaker_id", str(tmp_path), root=str(tmp_path / "none"))
  with pytest.raises(UserError, match="unknown packaged task"):
    pt.write_task("esc50", str(tmp_path))


def test_sources_are_disjoint_from_the_pretraining_corpus(tmp_path):
  """On a fake install where, as with Debian's alternatives, `es` links to the corpus voice."""
  root = str(tmp_path)
  corpus = []
  for source in real.SOURCES:
    folder = os.path.join(root, source.pattern.lstrip("/").replace("*", "f_Voice"))
    os.makedirs(folder, exist_ok=True)
    for name in ("vm-intro.wav", "digits/p00.wav", "x.ogg"):
      _write(os.path.join(folder, name), _tone(500, 0.5))
    corpus.append(dataclasses.replace(source, pattern=root + source.pattern))
  os.symlink(os.path.join(root, "usr/share/asterisk/sounds/es_MX_f_Voice"),
             os.path.join(root, "usr/share/asterisk/sounds/es"))
  _speech_tree(root)
  for folder, rel, _ in _SOUNDS:
    _touch(tmp_path, folder, rel)
  corpus_files = {f for source in corpus for f in real.source_files(source)}
  task_files = {os.path.realpath(r.path) for name in pt.NAMES
                for r in pt.recordings(pt.TASKS[name], root=root)}
  assert len(corpus_files) == 3 * len(real.SOURCES) and task_files
  assert not corpus_files & task_files
  assert not set(pt.PACKAGES) & ({s.package for s in real.SOURCES} | {drums.PACKAGE})
