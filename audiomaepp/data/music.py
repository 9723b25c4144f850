"""Synthetic music for the built-in corpus: random General MIDI pieces rendered by FluidSynth.

A piece is drawn from a NumPy generator: a tempo, a key and scale, and some of a melody, a chord
part, a bass line and a drum pattern, each on a random General MIDI instrument. Pieces are
written as one standard MIDI file (a small writer below) and rendered in one FluidSynth run with
reverb and chorus off, so the audio depends only on the pieces. The evaluation suite's pitch task
plays isolated single notes; the corpus plays melodies, chords and drums.
"""
import os
import shutil
import struct
import subprocess
import tempfile
from typing import Sequence

import numpy as np
import soundfile as sf

from audiomaepp.audio import io as audio_io

SAMPLE_RATE = audio_io.SAMPLE_RATE
EXECUTABLE = "fluidsynth"
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
DRUM_CHANNEL = 9
_TICKS_PER_S = 960  # division 480 at MIDI's default 120 bpm
_GAP_S = 0.5  # silence between pieces in one rendering; all sound is cut at each piece's end
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
           "dorian": (0, 2, 3, 5, 7, 9, 10), "pentatonic": (0, 2, 4, 7, 9)}
_DRUMS = {"kick": 36, "snare": 38, "closed_hat": 42, "open_hat": 46, "ride": 51, "clap": 39,
          "low_tom": 45, "high_tom": 50}
# Event: (time in s, MIDI message bytes).
Event = tuple[float, bytes]


def available() -> bool:
  """Whether FluidSynth and the General MIDI soundfont are installed."""
  return shutil.which(EXECUTABLE) is not None and os.path.isfile(SOUNDFONT)


def _note(events: list, channel: int, note: int, start: float, length: float, velocity: int):
  events.append((start, bytes([0x90 | channel, note, velocity])))
  events.append((start + length, bytes([0x80 | channel, note, 0])))


def random_piece(rng: np.random.Generator, duration: float) -> list[Event]:
  """The MIDI events of a random piece of `duration` seconds (times from 0)."""
  beat = 60.0 / rng.uniform(70, 170)
  root = int(rng.integers(0, 12))
  scale = _SCALES[str(rng.choice(list(_SCALES)))]
  pitches = [root + 12 * octave + step for octave in range(2, 9) for step in scale]
  parts = [p for p in ("melody", "chords", "bass", "drums") if rng.random() < 0.55]
  if not {"melody", "chords"} & set(parts):
    parts.append(str(rng.choice(["melody", "chords"])))
  events: list[Event] = []
  for channel, part in enumerate(parts):
    if part == "drums":
      _drums(rng, events, beat, duration)
      continue
    events.append((0.0, bytes([0xC0 | channel, int(rng.integers(0, 112))])))
    velocity = int(rng.integers(50, 120))
    if part == "melody":
      index = int(rng.integers(len(pitches) // 3, 2 * len(pitches) // 3))
      t = float(rng.choice([0.0, 0.5]) * beat)
      while t < duration:
        length = float(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0])) * beat
        index = int(np.clip(index + rng.integers(-3, 4), 0, len(pitches) - 1))
        if rng.random() < 0.85:  # else a rest
          _note(events, channel, pitches[index], t, 0.9 * length, velocity)
        t += length
    else:
      low = (36, 60) if part == "bass" else (48, 72)
      t = 0.0
      while t < duration:
        length = float(rng.choice([1.0, 2.0, 4.0])) * beat
        base = next(i for i, p in enumerate(pitches) if p >= int(rng.integers(*low)))
        chord = [base] if part == "bass" else [base, base + 2, base + 4]
        for i in chord:
          _note(events, channel, pitches[min(i, len(pitches) - 1)], t, 0.95 * length, velocity)
        t += length
  return events


def _drums(rng: np.random.Generator, events: list, beat: float, duration: float) -> None:
  names = list(_DRUMS)
  pattern = [(str(rng.choice(names)), int(rng.integers(60, 127)))
             if rng.random() < 0.7 else None for _ in range(int(rng.choice([4, 8, 16])))]
  step = beat * 4 / len(pattern)
  for i in range(int(duration / step)):
    hit = pattern[i % len(pattern)]
    if hit is not None:
      _note(events, DRUM_CHANNEL, _DRUMS[hit[0]], i * step, 0.9 * step, hit[1])


def _vlq(n: int) -> bytes:
  out = [n & 0x7F]
  n >>= 7
  while n:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  return bytes(reversed(out))


def midi_file(events: Sequence[Event]) -> bytes:
  """A format-0 standard MIDI file of `events` (stable-sorted by time, note-offs first)."""
  ticks = sorted(((int(round(t * _TICKS_PER_S)), msg[0] & 0xF0 != 0x80, i, msg)
                  for i, (t, msg) in enumerate(events)))
  track, last = bytearray(), 0
  for tick, _, _, msg in ticks:
    track += _vlq(tick - last) + msg
    last = tick
  track += _vlq(0) + b"\xff\x2f\x00"
  return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480)
          + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


def render(pieces: Sequence[tuple[list[Event], float]]) -> list[np.ndarray]:
  """16 kHz float32 waveforms of (events, duration) pieces, rendered in one FluidSynth run."""
  events, starts, t0 = [], [], 0.0
  for piece, duration in pieces:
    starts.append(t0)
    events.extend((t0 + t, msg) for t, msg in piece if t < duration)
    end = t0 + duration
    # All sound off and controllers reset on every channel, so no piece hears the one before.
    events.extend((end, bytes([0xB0 | ch, cc, 0])) for ch in range(16) for cc in (120, 121))
    t0 = end + _GAP_S
  with tempfile.TemporaryDirectory() as tmp:
    midi_path, wav_path = os.path.join(tmp, "pieces.mid"), os.path.join(tmp, "pieces.wav")
    with open(midi_path, "wb") as f:
      f.write(midi_file(events))
    subprocess.run([EXECUTABLE, "-ni", "-R", "0", "-C", "0", "-g", "0.5", "-r", str(SAMPLE_RATE),
                    "-F", wav_path, SOUNDFONT, midi_path], check=True, capture_output=True)
    audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
  if rate != SAMPLE_RATE:
    raise RuntimeError(f"FluidSynth wrote {rate} Hz audio, expected {SAMPLE_RATE}")
  audio = audio.mean(axis=1)
  out = []
  for start, (_, duration) in zip(starts, pieces):
    first, n = int(round(start * SAMPLE_RATE)), int(round(duration * SAMPLE_RATE))
    out.append(np.pad(audio[first:first + n], (0, max(0, first + n - len(audio)))))
  return out
