"""Decoding audio files into 16 kHz mono float32 waveforms.

Any format libsndfile reads (wav, flac, ogg/vorbis, mp3 with libsndfile >= 1.1, aiff, ...), any
sample rate (resampled with soxr's high-quality filter, the resampler behind librosa's default
`res_type='soxr_hq'`), any channel count (downmixed by averaging the channels). Files are read in
blocks, so memory stays bounded however long the file is.

Policy for bad input (every case raises `AudioError`, whose message names the file):
  * missing, empty (0 bytes) or undecodable files;
  * files with no samples;
  * files that end before the length their header declares (truncated downloads);
  * NaN or infinite samples: they only come from corrupt float files, and replacing them would
    hide the corruption, so the file is rejected rather than repaired.
"""
import dataclasses
import os
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from audiomaepp.errors import UserError

SAMPLE_RATE = 16000
# soxr's 'HQ' preset is what librosa uses for its default res_type='soxr_hq'.
RESAMPLE_QUALITY = "HQ"
# libsndfile estimates the length of MP3 streams, so a short read is not evidence of truncation.
_ESTIMATED_LENGTH_FORMATS = frozenset({"MP3", "MPEG"})


class AudioError(UserError):
  """An audio file that cannot be turned into a waveform; the message names the file and why."""


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What the file's header declares (before resampling and downmixing)."""
  path: str
  sample_rate: int
  channels: int
  num_frames: int
  format: str

  @property
  def duration_s(self) -> float:
    return self.num_frames / self.sample_rate

  def conversions(self) -> list[str]:
    """Human-readable list of what decoding does to reach 16 kHz mono (empty if nothing)."""
    notes = []
    if self.channels != 1:
      notes.append(f"downmixed {self.channels} channels to mono")
    if self.sample_rate != SAMPLE_RATE:
      notes.append(f"resampled {self.sample_rate} Hz to {SAMPLE_RATE} Hz")
    return notes


def audio_info(path: str) -> AudioInfo:
  """Reads the header of an audio file; raises `AudioError` if it is missing or undecodable."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise AudioError(f"{path}: empty file (0 bytes)")
  try:
    info = sf.info(path)
  except (sf.LibsndfileError, RuntimeError) as e:
    raise AudioError(f"{path}: undecodable audio ({e})") from e
  if info.frames <= 0:
    raise AudioError(f"{path}: no audio samples")
  if info.samplerate <= 0 or info.channels <= 0:
    raise AudioError(f"{path}: invalid header ({info.samplerate} Hz, {info.channels} channels)")
  return AudioInfo(path=path, sample_rate=info.samplerate, channels=info.channels,
                   num_frames=info.frames, format=info.format)


def resample(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
  """Resamples a mono waveform `(samples,)` from `sample_rate` to 16 kHz (float32)."""
  waveform = np.asarray(waveform, np.float32)
  if sample_rate == SAMPLE_RATE:
    return waveform
  return soxr.resample(waveform, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)


def iter_audio(path: str, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
  """Yields consecutive 16 kHz mono float32 blocks `(samples,)` of an audio file.

  Raises `AudioError` (possibly after some blocks were yielded) for any of the bad inputs listed
  in the module docstring.
  """
  info = audio_info(path)
  resampler = None
  if info.sample_rate != SAMPLE_RATE:
    resampler = soxr.ResampleStream(info.sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                    quality=RESAMPLE_QUALITY)
  block_frames = max(1, int(block_seconds * info.sample_rate))
  frames_read = 0
  try:
    with sf.SoundFile(info.path) as f:
      for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
        if not np.isfinite(block).all():
          bad = frames_read + int(np.argmin(np.isfinite(block).all(axis=1)))
          raise AudioError(
              f"{info.path}: non-finite samples (NaN or inf) at {bad / info.sample_rate:.3f} s")
        frames_read += len(block)
        mono = block.mean(axis=1, dtype=np.float32) if info.channels > 1 else block[:, 0]
        out = resampler.resample_chunk(mono) if resampler else mono
        if out.size:
          yield out
  except (sf.LibsndfileError, RuntimeError) as e:
    raise AudioError(f"{info.path}: corrupt or truncated: decoding failed after "
                     f"{frames_read / info.sample_rate:.3f} s ({e})") from e
  if frames_read == 0:
    raise AudioError(f"{info.path}: no audio samples")
  if frames_read < info.num_frames and info.format not in _ESTIMATED_LENGTH_FORMATS:
    raise AudioError(f"{info.path}: truncated: header declares {info.num_frames} frames, "
                     f"only {frames_read} could be decoded")
  if resampler:
    tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    if tail.size:
      yield tail


def load_audio(path: str) -> np.ndarray:
  """Decodes a whole audio file to a 16 kHz mono float32 waveform `(samples,)`.

  Raises `AudioError` naming the file for missing, empty, undecodable, truncated or non-finite
  input. For very long files prefer `audiomaepp.audio.log_mel_file`, which streams.
  """
  return np.concatenate(list(iter_audio(path)))
