"""HEAR tasks on real recordings from Debian packages: environmental sounds, language, speaker.

Each task is a declarative `Task`: its `Source`s (a package, its install folder, a glob), a
label rule (regexes on the path under the folder, first match wins) and a split-unit rule (a
regex whose group 1 names the unit). Units go to one split each (`hear_writer.split_units`,
about 60/20/20): for the sounds a recording and its numbered takes (`Fire1.wav`, `Fire2.wav`),
split within each class so that every class reaches every split; for speech a prompt (the
file stem shared by the translations of one prompt across voices), so no prompt text is heard
in two splits. Each recording is trimmed to its sound (`TRIM_DB` below its peak), skipped when
shorter than `min_sound_s`, cut into up to `max_windows` windows of `duration_s` starting
`hop_s` apart (the middle ones) or centred in silence, and peak-normalised. Speech is
band-limited to 4 kHz, the band of the 8 kHz telephone prompts among its sources, so bandwidth
does not give the source away. Per class and split at most `per_class` times 0.6/0.2/0.2
clips are kept, taken in a seeded order that alternates between the class's sources. Data card
with packages, licences and counts: docs/data.md.

    from audiomaepp.evaluation import packaged_tasks
    packaged_tasks.write_task("language_id", "tasks")  # one of packaged_tasks.NAMES
"""
import dataclasses
import glob
import os
import re
from collections.abc import Iterator
from typing import Optional

import numpy as np
import soundfile as sf
import soxr

from audiomaepp import audio
from audiomaepp.errors import UserError
from audiomaepp.evaluation import hear_writer
from audiomaepp.evaluation.hear_writer import SPLITS, fit_clip
from audiomaepp.evaluation.tasks import SAMPLE_RATE

TRIM_DB = 35.0
_FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}
_TAKES = r"(.+?)[-_. ]?\d*\.\w+$"  # 'Fire2.wav', 'default_grass_footstep.3.ogg': one recording
_STEM = r"(.+)\.\w+$"


@dataclasses.dataclass(frozen=True)
class Source:
  """Recordings of one Debian package: the files matching `pattern` under `folder`."""
  package: str
  folder: str
  pattern: str  # recursive glob under `folder`
  labels: tuple[tuple[str, str], ...]  # (label, regex on the path under `folder`)
  unit: str = _STEM  # group 1 of this regex on the path under `folder`: the split unit
  skip: str = ""  # paths under `folder` matching this regex are left out


@dataclasses.dataclass(frozen=True)
class Task:
  """A multiclass HEAR task over packaged recordings."""
  name: str
  description: str
  classes: tuple[str, ...]
  sources: tuple[Source, ...]
  duration_s: float
  per_class: int  # clips per class, all splits together (at most)
  stratified: bool  # units split within each class (sounds) or across classes (prompts)
  min_sound_s: float
  max_windows: int = 1
  hop_s: float = 1.0  # between the starts of consecutive windows
  band_limit_hz: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Recording:
  """One labelled file of a task and the unit that takes it to a split."""
  path: str
  label: str
  unit: str
  source: int  # index in Task.sources


def _speech(package, folder, pattern, label, unit=_STEM, skip=""):
  """A source of one voice or language: every file gets `label`."""
  return Source(package, folder, pattern, ((label, ""),), unit, skip)


_TUXPAINT = "/usr/share/tuxpaint/stamps"
_SCRATCH = "/usr/share/scratch/Media/Sounds"
_MINETEST = "/usr/share/games/minetest/games/minetest_game/mods"
_LINCITY = "/usr/share/games/lincity-ng/sounds"
_FILLETS = "/usr/share/games/fillets-ng/sound"
_ASTERISK = "/usr/share/asterisk/sounds"
_TUX_DESC = r"(.+)_desc_\w+\.ogg$"  # 'animals/birds/crow_desc_fr.ogg' -> the stamp
_DIALOG = r"([^/]+)\.ogg$"  # 'gods/cs/kuf-m-disk.ogg' -> the dialog line, same in every language
_ASTERISK_SKIP = r"^silence/|beep"  # silence and tones, not speech

ENV_SOUNDS = Task(
    name="env_sounds",
    description="environmental sound class of real recordings from tuxpaint-stamps-default, "
                "scratch, minetest-data and lincity-ng-data, recordings disjoint across splits",
    classes=("bird", "farm_animal", "dog_cat", "wild_mammal", "insect", "footsteps", "door",
             "fire", "water", "human_vocal", "vehicle", "tool", "machine"),
    sources=(
        Source("tuxpaint-stamps-default", _TUXPAINT, "**/*.ogg", (
            ("bird", r"^animals/birds/"),
            ("farm_animal", r"^animals/mammals/(bovines|equines)/|^animals/mammals/pig"),
            ("dog_cat", r"^animals/mammals/(dogs|cats)/|/blackcat\."),
            ("wild_mammal", r"^animals/(mammals|marsupials)/"),
            ("insect", r"^animals/insects/"),
            ("vehicle", r"/firetruck\."),
            ("tool", r"^household/(tools|arttools)/"),
            ("machine", r"^household/(Washing-machine|vacuum_cleaner)\."),
        ), _TAKES, skip=r"_desc"),
        Source("scratch", _SCRATCH, "**/*.*", (
            ("bird", r"^Animal/(Bird|Duck|Goose|Owl|Rooster)\."),
            ("farm_animal", r"^Animal/Horse"),
            ("dog_cat", r"^Animal/(Cat|Kitten|Meow|Dog\d|WolfHowl)\."),
            ("wild_mammal", r"^Animal/SeaLion\."),
            ("insect", r"^Animal/Cricket"),
            ("footsteps", r"/Footsteps"),
            ("door", r"/Door"),
            ("water", r"^Effects/(Bubbles|Plunge|Ripples|WaterDrop|WaterRunning)\."),
            ("human_vocal", r"^Human/(BabyCry|Cough|Laugh|Scream|Sneeze)"),
            ("vehicle", r"^Effects/(CarPassing|MotorcyclePassing)\."),
            ("machine", r"^Effects/(SewingMachine|Typing)\."),
        ), _TAKES),
        Source("minetest-data", _MINETEST, "*/sounds/*.ogg", (
            ("footsteps", r"_footstep"),
            ("door", r"_door_|_fencegate_|_chest_(open|close)"),
            ("fire", r"^fire/sounds/fire_(fire|large|small)|gunpowder_burning"),
            ("water", r"env_sounds_water"),
            ("vehicle", r"carts_cart_moving"),
            ("tool", r"_dig_(choppy|cracky|metal)|_tool_breaks"),
        ), _TAKES),
        Source("lincity-ng-data", _LINCITY, "*.wav", (
            ("door", r"^Window(Open|Close)\."),
            ("fire", r"^Fire(\d|Wasteland)"),
            ("water", r"^(Water|ParklandLake)\d"),
            ("vehicle", r"^(RailTrain|TraficHigh|TraficLow)\d"),
            ("tool", r"^Blacksmith\d"),
            ("machine", r"^(IndustryHigh|IndustryLight|Mill)\d"),
        ), _TAKES),
    ),
    duration_s=2.0, per_class=60, stratified=True, min_sound_s=0.2, max_windows=5)

# The speech folders, each as (its language, the source labelled by speaker): speaker ID takes
# them as they are; language ID gives every file of a folder its language.
_SPEECH = (
    # The fish's lines are '<level>-v-<line>' (velká, big) and '<level>-m-<line>' (malá).
    ("cs", Source("fillets-ng-data-cs", _FILLETS, "**/cs/*.ogg",
                  (("cs-big-fish", r"/[^/-]+-v-[^/]+$"), ("cs-small-fish", r"/[^/-]+-m-[^/]+$")),
                  _DIALOG)),
    ("nl", Source("fillets-ng-data-nl", _FILLETS, "**/nl/*.ogg",
                  (("nl-big-fish", r"/[^/-]+-v-[^/]+$"), ("nl-small-fish", r"/[^/-]+-m-[^/]+$")),
                  _DIALOG)),
    ("es", _speech("tuxpaint-stamps-default", _TUXPAINT, "**/*_desc_es.ogg", "es-tuxpaint",
                   _TUX_DESC)),
    ("fr", _speech("tuxpaint-stamps-default", _TUXPAINT, "**/*_desc_fr.ogg", "fr-tuxpaint",
                   _TUX_DESC)),
    ("ru", _speech("tuxpaint-stamps-default", _TUXPAINT, "**/*_desc_ru.ogg", "ru-tuxpaint",
                   _TUX_DESC)),
    ("es", _speech("asterisk-prompt-es-co", f"{_ASTERISK}/es", "**/*.gsm", "es-asterisk",
                   skip=_ASTERISK_SKIP)),
    ("fr", _speech("asterisk-prompt-fr-armelle", f"{_ASTERISK}/fr", "**/*.gsm", "fr-asterisk",
                   skip=_ASTERISK_SKIP)),
    ("ru", _speech("asterisk-core-sounds-ru-wav", f"{_ASTERISK}/ru_RU_f_IvrvoiceRU", "**/*.wav",
                   "ru-asterisk", skip=_ASTERISK_SKIP)),
)

LANGUAGE_ID = Task(
    name="language_id",
    description="spoken language (cs, es, fr, nl, ru; two or more voices each) of real speech "
                "from fillets-ng-data-cs/-nl, tuxpaint-stamps-default and Asterisk prompt "
                "packages, band-limited to 4 kHz, prompts disjoint across splits",
    classes=("cs", "es", "fr", "nl", "ru"),
    sources=tuple(dataclasses.replace(source, labels=((language, ""),))
                  for language, source in _SPEECH),
    duration_s=3.0, per_class=200, stratified=False, min_sound_s=0.5, band_limit_hz=4000)

SPEAKER_ID = Task(
    name="speaker_id",
    description="speaker (ten voices, two or more per language) of real speech from "
                "fillets-ng-data-cs/-nl, tuxpaint-stamps-default and Asterisk prompt packages, "
                "band-limited to 4 kHz, prompts disjoint across splits",
    classes=("cs-big-fish", "cs-small-fish", "nl-big-fish", "nl-small-fish", "es-tuxpaint",
             "es-asterisk", "fr-tuxpaint", "fr-asterisk", "ru-tuxpaint", "ru-asterisk"),
    sources=tuple(source for _, source in _SPEECH),
    duration_s=3.0, per_class=80, stratified=False, min_sound_s=0.5, band_limit_hz=4000)

TASKS = {task.name: task for task in (ENV_SOUNDS, LANGUAGE_ID, SPEAKER_ID)}
NAMES = tuple(TASKS)
PACKAGES = tuple(dict.fromkeys(s.package for t in TASKS.values() for s in t.sources))


def _under(root: str, folder: str) -> str:
  return os.path.join(root, folder.lstrip("/"))


def recordings(task: Task, root: str = "/") -> list[Recording]:
  """The task's labelled recordings (sorted by path per source); `root` prefixes the folders.

  Raises UserError naming the packages to install when a source has no files.
  """
  found, missing = [], []
  for index, source in enumerate(task.sources):
    folder = _under(root, source.folder)
    paths = sorted(glob.glob(os.path.join(folder, source.pattern), recursive=True))
    if not paths:
      missing.append(source.package)
    for path in paths:
      rel = os.path.relpath(path, folder).replace(os.sep, "/")
      if source.skip and re.search(source.skip, rel):
        continue
      label = next((label for label, rule in source.labels if re.search(rule, rel)), None)
      unit = re.search(source.unit, rel)
      if label is not None and unit:
        found.append(Recording(path, label, unit.group(1), index))
  if missing:
    packages = " ".join(dict.fromkeys(missing))
    raise UserError(f"the {task.name} task needs the Debian packages {packages}: install them "
                    f"with `apt-get install -y --no-install-recommends {packages}` "
                    "(`make deps-real`)")
  return found


def unit_splits(task: Task, found: list[Recording], seed: int) -> dict[tuple[str, str], str]:
  """(label, unit) of every recording -> its split; a unit is in one split only."""
  groups = {}
  for r in found:
    groups.setdefault(r.label if task.stratified else "", set()).add(r.unit)
  split_of = {}
  for group, units in sorted(groups.items()):
    for split, names in hear_writer.split_units(sorted(units), seed).items():
      split_of.update({(group, name): split for name in names})
  return {(r.label, r.unit): split_of[(r.label if task.stratified else "", r.unit)]
          for r in found}


def load(path: str) -> np.ndarray:
  """A 16 kHz mono waveform; headerless `.gsm` files (GSM 06.10 at 8 kHz) included.

  An empty or undecodable file gives no samples (a few packaged prompts are empty). MP3s are
  read whole: libsndfile overestimates some MP3s' length, and block reads (`audio.load_audio`)
  then end in unwritten, run-dependent samples.
  """
  if path.endswith(".gsm"):
    waveform, _ = sf.read(path, dtype="float32", format="RAW", subtype="GSM610",
                          samplerate=8000, channels=1)
    return audio.resample(waveform, 8000)
  if path.endswith(".mp3"):
    waveform, rate = sf.read(path, dtype="float32", always_2d=True)
    return audio.resample(waveform.mean(axis=1), rate)
  try:
    return audio.load_audio(path)
  except audio.AudioError:
    return np.zeros(0, np.float32)


def windows(task: Task, waveform: np.ndarray) -> list[np.ndarray]:
  """The clips of one recording (see the module doc); none when it holds too little sound."""
  if task.band_limit_hz:
    low_rate = 2 * task.band_limit_hz
    waveform = audio.resample(soxr.resample(waveform, SAMPLE_RATE, low_rate), low_rate)
  peak = float(np.abs(waveform).max()) if len(waveform) else 0.0
  if peak == 0.0:
    return []
  loud = np.flatnonzero(np.abs(waveform) >= peak * 10 ** (-TRIM_DB / 20))
  sound = waveform[loud[0]:loud[-1] + 1]
  if len(sound) < task.min_sound_s * SAMPLE_RATE:
    return []
  size, hop = int(task.duration_s * SAMPLE_RATE), int(task.hop_s * SAMPLE_RATE)
  count = min(task.max_windows, 1 + max(0, len(sound) - size) // hop)
  start = max(0, (len(sound) - size - (count - 1) * hop) // 2)
  clips = [fit_clip(sound[start + i * hop:], size) for i in range(count)]
  return [clip * np.float32(0.9 / peak) for clip in clips]


def _clips(task: Task, found: list[Recording], seed: int
           ) -> Iterator[tuple[str, np.ndarray, str]]:
  """(split, clip, label) of the task, class by class; raises when a class misses a split."""
  if task.stratified:  # few recordings: drop those without a clip before they take a split
    found = [r for r in found if windows(task, load(r.path))]
  split_of = unit_splits(task, found, seed)
  rng = np.random.default_rng([seed, 3])
  for label in task.classes:
    for split in SPLITS:
      by_source = {}
      for r in found:
        if r.label == label and split_of[(r.label, r.unit)] == split:
          by_source.setdefault(r.source, []).append(r)
      queues = [[group[i] for i in rng.permutation(len(group))]
                for _, group in sorted(by_source.items())]
      order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues
               if i < len(q)]  # alternating between the sources
      quota, count = round(task.per_class * _FRACTIONS[split]), 0
      for r in order:
        for clip in windows(task, load(r.path))[:quota - count]:
          yield split, clip, label
          count += 1
        if count >= quota:
          break
      if count == 0:
        raise UserError(f"the {task.name} task has no {label!r} clip in split {split!r}")


def write_task(name: str, out_dir: str, seed: int = 0, root: str = "/") -> str:
  """Writes `out_dir/<name>-v1` in the HEAR layout; returns its path. `root` prefixes folders."""
  if name not in TASKS:
    raise UserError(f"unknown packaged task {name!r}; choose one of {', '.join(NAMES)}")
  task = TASKS[name]
  return hear_writer.write_hear_task(out_dir, task.name, _clips(task, recordings(task, root), seed),
                                     task.classes, task.duration_s, task.description)
