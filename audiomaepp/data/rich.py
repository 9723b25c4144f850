"""The richer built-in corpus: speech, music, synthetic sounds and their mixtures, no downloads.

Clip i is drawn from `np.random.default_rng([seed, 15, i])` (a stream no evaluation task uses):
speech from espeak-ng (`speech`), music from FluidSynth (`music`), the sounds of `synthetic`,
or a mixture of two of them, each over a noise floor at a random level, 2 to 6 s long. Labels
(multi-label): 'speech', 'music' and the synthetic classes present. Clips are generated in fixed
chunks of `CHUNK` (one FluidSynth run per chunk), in parallel worker processes, so the corpus
depends only on (num_clips, seed); it is written in the AudioSet layout and goes through the same
shard builder as real data (`synthetic.build_once`).

    config.data.source = "rich"; config.data.synthetic_num_clips = 4096
"""
from concurrent import futures
import multiprocessing
import os
from typing import Optional

import numpy as np
import soundfile as sf
import tqdm

from audiomaepp.data import music
from audiomaepp.data import sources
from audiomaepp.data import speech
from audiomaepp.data import synthetic
from audiomaepp.errors import UserError

SAMPLE_RATE = synthetic.SAMPLE_RATE
CLASSES = ("speech", "music") + synthetic.CLASSES
KINDS = ("speech", "music", "synthetic", "mixture")
KIND_WEIGHTS = (0.4, 0.35, 0.1, 0.15)
CHUNK = 32  # clips per generation task (one FluidSynth run)
_STREAM = 15  # middle word of every clip's seed: keeps this corpus's draws apart from others
# Part of the cache directory name: bump it when the generated signals change.
CORPUS_VERSION = 1


def check_engines() -> None:
  """Raises UserError naming what to install when espeak-ng or FluidSynth is missing."""
  missing = [name for name, ok in (("espeak-ng", speech.available()),
                                   (f"fluidsynth with {music.SOUNDFONT}", music.available()))
             if not ok]
  if missing:
    raise UserError(f"config.data.source='rich' needs {' and '.join(missing)}: install them with "
                    "`apt-get install -y espeak-ng fluidsynth fluid-soundfont-gm` (`make deps`), "
                    "or use config.data.source='synthetic'")


def _plan(index: int, seed: int) -> dict:
  """What clip `index` is: its kind, duration, components and levels (no audio yet)."""
  rng = np.random.default_rng([seed, _STREAM, index])
  duration = float(rng.uniform(2.0, 6.0))
  kind = str(rng.choice(KINDS, p=KIND_WEIGHTS))
  parts = ([str(k) for k in rng.choice(KINDS[:3], size=2, replace=False)] if kind == "mixture"
           else [kind])
  components = []
  for part in parts:
    if part == "speech":
      components.append(("speech", speech.random_utterance(rng)))
    elif part == "music":
      components.append(("music", music.random_piece(rng, duration)))
    else:
      components.append(("synthetic", int(rng.integers(2 ** 31))))
  return {"duration": duration, "components": components,
          "gains_db": rng.uniform(-12, 0, size=len(parts)).tolist(),
          "noise_db": float(rng.uniform(-70, -25)),
          "noise_seed": int(rng.integers(2 ** 31))}


def _speech_waveform(utterance: dict, n: int, rng: np.random.Generator) -> np.ndarray:
  """An utterance placed at a random offset; long ones are cut, pauses fill the rest."""
  voice = speech.synthesize(**utterance)[:n]
  out = np.zeros(n, np.float32)
  start = int(rng.integers(0, n - len(voice) + 1))
  out[start:start + len(voice)] = voice
  return out


def make_chunk(first: int, count: int, seed: int) -> list[tuple[np.ndarray, tuple[str, ...]]]:
  """Clips first..first+count-1: (16 kHz float32 waveform, sorted class names) each."""
  plans = [_plan(i, seed) for i in range(first, first + count)]
  pieces = [(events, plan["duration"]) for plan in plans
            for name, events in plan["components"] if name == "music"]
  rendered = iter(music.render(pieces) if pieces else ())
  clips = []
  for plan in plans:
    n = int(plan["duration"] * SAMPLE_RATE)
    rng = np.random.default_rng(plan["noise_seed"])
    mix = rng.standard_normal(n) * 10 ** (plan["noise_db"] / 20)
    names = set()
    for (name, spec), gain_db in zip(plan["components"], plan["gains_db"]):
      if name == "speech":
        wave = _speech_waveform(spec, n, rng)
        names.add("speech")
      elif name == "music":
        wave = next(rendered)[:n]
        names.add("music")
      else:
        wave, classes = synthetic.make_clip_of_length(n, seed=spec)
        names.update(classes)
      peak = float(np.abs(wave).max())
      if peak > 0:
        mix = mix + wave * (10 ** (gain_db / 20) * 0.9 / peak)
    clips.append((np.clip(mix, -1, 1).astype(np.float32), tuple(c for c in CLASSES if c in names)))
  return clips


def _write_chunk(audio_dir: str, first: int, count: int, seed: int) -> list[tuple]:
  rows = []
  for i, (waveform, names) in enumerate(make_chunk(first, count, seed), first):
    ytid = f"rich{i:06d}"
    sf.write(os.path.join(audio_dir, ytid + ".wav"), waveform, SAMPLE_RATE, subtype="PCM_16")
    rows.append((ytid, len(waveform) / SAMPLE_RATE, names))
  return rows


def write_corpus(audio_dir: str, num_clips: int, seed: int = 0, num_workers: int = 0,
                 progress: bool = True) -> sources.Sources:
  """Writes the clips (`rich000000.wav`, ...) and the AudioSet-style CSVs; returns the inputs.

  Chunks are generated in `num_workers` spawned processes (0: in this one); the output does not
  depend on it.
  """
  check_engines()
  os.makedirs(audio_dir, exist_ok=True)
  chunks = [(audio_dir, s, min(CHUNK, num_clips - s), seed) for s in range(0, num_clips, CHUNK)]
  rows = []
  with tqdm.tqdm(total=num_clips, desc="rich corpus", unit="clip", disable=not progress) as bar:
    if num_workers:
      # Spawned, not forked: the caller may have started JAX, whose threads do not survive a fork.
      with futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for chunk in pool.map(_write_chunk, *zip(*chunks)):
          rows.extend(chunk)
          bar.update(len(chunk))
    else:
      for args in chunks:
        rows.extend(_write_chunk(*args))
        bar.update(args[2])
  return synthetic.write_audioset_csvs(
      audio_dir, [(ytid, duration, [f"/rich/{c}" for c in names]) for ytid, duration, names in rows],
      [f"/rich/{c}" for c in CLASSES], CLASSES)


def dataset_dir(data_dir: Optional[str] = None, num_clips: int = 4096, seed: int = 0) -> str:
  """Where `build` puts the corpus: the TFDS data_dir to read `audio_logmel` from."""
  return os.path.join(data_dir or synthetic.DEFAULT_DIR,
                      f"rich-v{CORPUS_VERSION}-{num_clips}-seed{seed}")


def build(data_dir: Optional[str] = None, num_clips: int = 4096, seed: int = 0,
          num_workers: Optional[int] = None, progress: bool = True) -> str:
  """Builds the corpus once (audio, then log-mel shards); returns its TFDS data_dir.

  `num_workers` processes generate and encode (default: one per CPU). Like `synthetic.build`,
  the corpus is built in a private directory and renamed into place; later calls return at once.
  """
  root = dataset_dir(data_dir, num_clips, seed)
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  return synthetic.build_once(
      root, lambda audio_dir: write_corpus(audio_dir, num_clips, seed, num_workers, progress),
      num_workers=num_workers, progress=progress)
