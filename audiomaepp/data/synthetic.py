"""A built-in synthetic corpus, so the demo and the tests need no downloads.

Deterministic NumPy signals at 16 kHz: steady tones, linear and exponential chirps, harmonic
stacks with vibrato, band-limited noise bursts and click trains, over a faint noise floor; one
or two sound classes per clip (multi-label), lengths from 0.3 s to 10 s (a fifth shorter than
2 s, to exercise the short-clip path). The clips are written as WAV files in the AudioSet layout
(segment CSVs per split plus a class index CSV; every 10th clip is 'eval') and go through the
same builder as real data.
"""
import csv
import os
import shutil
import uuid
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.fft
import soundfile as sf

from audiomaepp.audio import features
from audiomaepp.data import builders
from audiomaepp.data import sources

CLASSES = ("tone", "chirp", "harmonic_stack", "noise_burst", "click_train")
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "audiomaepp")
SAMPLE_RATE = features.SAMPLE_RATE
EVAL_EVERY = 10  # clip i is in 'eval' when i % EVAL_EVERY == 0
# Part of the cache directory name: bump it when the signals or the shard format change.
CORPUS_VERSION = 2


def _envelope(rng: np.random.Generator, n: int) -> np.ndarray:
  """A random attack/hold/release envelope, so events start and end inside the clip."""
  start = int(rng.integers(0, n // 2))
  length = int(rng.integers(n // 4, n - start + 1))
  ramp = max(1, length // 8)
  env = np.zeros(n)
  env[start:start + length] = 1.0
  env[start:start + ramp] = np.linspace(0, 1, ramp)
  env[start + length - ramp:start + length] = np.linspace(1, 0, ramp)
  return env


def _signal(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
  t = np.arange(n) / SAMPLE_RATE
  duration = n / SAMPLE_RATE
  if kind == "tone":
    return np.sin(2 * np.pi * rng.uniform(100, 4000) * t + rng.uniform(0, 2 * np.pi))
  if kind == "chirp":
    f0, f1 = rng.uniform(100, 6000, size=2)
    if rng.random() < 0.5:  # linear sweep
      phase = f0 * t + (f1 - f0) * t ** 2 / (2 * duration)
    else:  # exponential sweep
      k = np.log(f1 / f0) / duration
      phase = f0 * np.expm1(k * t) / k
    return np.sin(2 * np.pi * phase)
  if kind == "harmonic_stack":
    f0 = rng.uniform(80, 600)
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vibrato) / SAMPLE_RATE
    harmonics = range(1, min(12, int(7000 // (f0 * 1.02))) + 1)
    return sum(np.sin(h * phase) / h for h in harmonics) / 2
  if kind == "noise_burst":
    size = scipy.fft.next_fast_len(n, real=True)  # n itself may be a large prime
    spectrum = scipy.fft.rfft(rng.standard_normal(size))
    freqs = scipy.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    low = rng.uniform(50, 4000)
    spectrum[(freqs < low) | (freqs > low * rng.uniform(1.5, 4))] = 0
    noise = scipy.fft.irfft(spectrum, size)[:n]
    return noise / (np.abs(noise).max() + 1e-9) * _envelope(rng, n)
  if kind == "click_train":
    clicks = np.zeros(n)
    period = int(SAMPLE_RATE / rng.uniform(2, 40))
    clicks[rng.integers(0, period)::period] = 1.0
    decay = np.exp(-np.arange(80) / rng.uniform(5, 20))
    return np.convolve(clicks, decay)[:n] * np.sign(rng.standard_normal())
  raise ValueError(f"unknown synthetic sound class {kind!r}; expected one of {CLASSES}")


def _mix(rng: np.random.Generator, n: int) -> tuple[np.ndarray, tuple[str, ...]]:
  kinds = rng.choice(len(CLASSES), size=1 + int(rng.random() < 0.3), replace=False)
  names = tuple(CLASSES[k] for k in sorted(kinds))
  mix = sum(rng.uniform(0.1, 0.5) * _signal(name, rng, n) for name in names)
  mix = mix + 10 ** rng.uniform(-4, -2.5) * rng.standard_normal(n)  # noise floor
  return np.clip(mix, -1, 1).astype(np.float32), names


def make_clip(index: int, seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
  """Clip `index` of the corpus: a 16 kHz mono waveform `(samples,)` and its class names."""
  rng = np.random.default_rng([seed, index])
  duration = rng.uniform(0.3, 2.0) if rng.random() < 0.2 else rng.uniform(2.0, 10.0)
  return _mix(rng, int(duration * SAMPLE_RATE))


def make_clip_of_length(num_samples: int, seed: int) -> tuple[np.ndarray, tuple[str, ...]]:
  """One or two random sound classes over a noise floor, `num_samples` long (for mixtures)."""
  return _mix(np.random.default_rng(seed), num_samples)


def write_corpus(audio_dir: str, num_clips: int = 512, seed: int = 0) -> sources.Sources:
  """Writes the clips (`syn00000.wav`, ...) and the AudioSet-style CSVs; returns the inputs."""
  os.makedirs(audio_dir, exist_ok=True)
  rows = []
  for i in range(num_clips):
    waveform, names = make_clip(i, seed)
    ytid = f"syn{i:05d}"
    sf.write(os.path.join(audio_dir, ytid + ".wav"), waveform, SAMPLE_RATE, subtype="PCM_16")
    rows.append((ytid, len(waveform) / SAMPLE_RATE, [f"/synthetic/{name}" for name in names]))
  return write_audioset_csvs(audio_dir, rows, [f"/synthetic/{name}" for name in CLASSES],
                            CLASSES)


def write_audioset_csvs(audio_dir: str, rows: Sequence[tuple[str, float, Sequence[str]]],
                        mids: Sequence[str], names: Sequence[str]) -> sources.Sources:
  """Segment CSVs of (ytid, duration in s, label mids) rows (the i-th row is 'eval' when
  i % EVAL_EVERY == 0) and the class index CSV of `mids` and `names`; returns the inputs."""
  splits = {"train": [], "eval": []}
  for i, (ytid, duration, labels) in enumerate(rows):
    split = "eval" if i % EVAL_EVERY == 0 else "train"
    splits[split].append([ytid, "0.000", f"{duration:.3f}", ",".join(labels)])
  segments = []
  for split, split_rows in splits.items():
    path = os.path.join(audio_dir, f"{split}_segments.csv")
    with open(path, "w", newline="") as f:
      f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
      csv.writer(f, quoting=csv.QUOTE_MINIMAL).writerows(split_rows)
    segments.append((split, path))
  labels_csv = os.path.join(audio_dir, "class_labels_indices.csv")
  with open(labels_csv, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "mid", "display_name"])
    writer.writerows([i, mid, name] for i, (mid, name) in enumerate(zip(mids, names)))
  return sources.Sources(audio_dir, segments_csvs=tuple(segments), labels_csv=labels_csv)


def dataset_dir(data_dir: Optional[str] = None, num_clips: int = 512, seed: int = 0) -> str:
  """Where `build` puts the corpus: the TFDS data_dir to read `audio_logmel` from."""
  return os.path.join(data_dir or DEFAULT_DIR,
                      f"synthetic-v{CORPUS_VERSION}-{num_clips}-seed{seed}")


def build(data_dir: Optional[str] = None, num_clips: int = 512, seed: int = 0,
          num_workers: int = 0) -> str:
  """Builds the corpus once (audio files, then log-mel shards); returns its TFDS data_dir.

  The result lives in `data_dir/synthetic-v<CORPUS_VERSION>-<num_clips>-seed<seed>` (default
  data_dir: ~/.cache/audiomaepp). It is built in a private directory and renamed into place, so
  concurrent callers (several hosts or tests) never see a partial corpus; later calls return
  at once.
  """
  return build_once(dataset_dir(data_dir, num_clips, seed),
                    lambda audio_dir: write_corpus(audio_dir, num_clips, seed),
                    num_workers=num_workers, progress=False)


def build_once(root: str, write: Callable[[str], sources.Sources], num_workers: int = 0,
               progress: bool = False) -> str:
  """Builds a generated corpus into `root` unless it is there; returns `root`.

  `write(audio_dir)` writes the audio and returns the build inputs. Everything happens in a
  private staging directory renamed into place, so concurrent callers (several hosts or tests)
  never see a partial corpus.
  """
  if _is_built(root):
    return root
  staging = f"{root}.tmp-{uuid.uuid4().hex}"
  try:
    corpus = write(os.path.join(staging, "audio"))
    builders.build(corpus, staging, num_workers=num_workers, progress=progress)
    try:
      os.rename(staging, root)
    except OSError:
      if not _is_built(root):  # not a concurrent builder winning the race
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return root


def _is_built(root: str) -> bool:
  return os.path.exists(os.path.join(builders.dataset_dir(root), "dataset_info.json"))
