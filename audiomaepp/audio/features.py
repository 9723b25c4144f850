"""Log-mel spectrograms: one definition for shard building, feature extraction, demo.

16 kHz mono; STFT with n_fft 400, periodic Hann window of 400, hop 160, centred with reflect
padding of 200 samples each side, power 2; 80 mel bins, HTK scale, 50-8000 Hz, no area
normalisation (torchaudio's `MelSpectrogram` defaults); natural log of (power + float32 eps);
layout (time, mel). A clip of S samples gives 1 + S // 160 frames (2 s -> 201).

Three implementations of the same function: `log_mel` (NumPy, in memory), `LogMelStream` /
`log_mel_file` (NumPy, block by block, bounded memory for hour-long files) and `log_mel_jax`
(batched, jit-able, for use on device). Tests hold all three to the original's torchaudio output.
The numbers and their sources: docs/reference.md#features.
"""
import functools
import os
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.sparse

from audiomaepp.audio import io

SAMPLE_RATE = io.SAMPLE_RATE
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
F_MIN = 50.0
F_MAX = 8000.0
LOG_EPS = float(np.finfo(np.float32).eps)
STD_EPS = 1e-8
PAD = N_FFT // 2
# Reflect padding of 200 samples needs at least 201 samples (as in torch.nn.functional.pad).
MIN_SAMPLES = PAD + 1
# Frames transformed at a time in NumPy: the (frames, 400) temporaries (400 KB) stay in cache,
# which is several times faster than whole-clip arrays, and memory stays bounded.
_FRAMES_PER_CHUNK = 256

Array = Union[np.ndarray, jax.Array]


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
  """The HTK mel filterbank `(n_fft // 2 + 1, mel)` = (201, 80), float32, unnormalised.

  Triangles between mel-spaced edge frequencies, evaluated at the STFT bin frequencies (as
  torchaudio's `melscale_fbanks`; equal to `librosa.filters.mel(htk=True, norm=None)`). Written
  out rather than taken from librosa, whose first call costs seconds of lazy imports in every
  worker process.
  """
  bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), N_MELS + 2))
  widths = np.diff(edges)
  distance = edges[None, :] - bins[:, None]  # (bins, mel + 2)
  rising = -distance[:, :-2] / widths[:-1]
  falling = distance[:, 2:] / widths[1:]
  fb = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
  fb.setflags(write=False)  # cached and shared
  return fb


@functools.lru_cache(maxsize=None)
def _mel_filterbank_sparse() -> scipy.sparse.csr_matrix:
  # 2% of the entries are non-zero; a sparse product is also single-threaded, which keeps
  # throughput steady in worker processes on a busy machine (threaded BLAS is not).
  return scipy.sparse.csr_matrix(mel_filterbank())


@functools.lru_cache(maxsize=None)
def _window() -> np.ndarray:
  """Periodic Hann window of n_fft samples (torch.hann_window's default)."""
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
  window.setflags(write=False)  # cached and shared
  return window


def num_frames(num_samples: int) -> int:
  """Number of log-mel frames of a 16 kHz clip of `num_samples` samples."""
  return 1 + num_samples // HOP_LENGTH


def _log_mel_frames(frames: np.ndarray) -> np.ndarray:
  """`(frames, n_fft)` windows of the padded signal -> `(frames, mel)` log-mel, float32."""
  # scipy's pocketfft transforms float32 natively (numpy's runs ~10x slower on float32 here).
  spectrum = scipy.fft.rfft(frames * _window(), axis=-1)
  power = spectrum.real ** 2 + spectrum.imag ** 2
  return np.log(np.asarray(power @ _mel_filterbank_sparse()) + np.float32(LOG_EPS))


def _frames_of(padded: np.ndarray) -> np.ndarray:
  """All full hop-spaced windows of `padded` as a strided view `(frames, n_fft)`."""
  return np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]


def _log_mel_windows(frames: np.ndarray) -> np.ndarray:
  """`_log_mel_frames` in chunks, so temporaries stay small for long inputs."""
  return np.concatenate([_log_mel_frames(frames[i:i + _FRAMES_PER_CHUNK])
                         for i in range(0, len(frames), _FRAMES_PER_CHUNK)])


def _check_waveform(waveform: np.ndarray) -> np.ndarray:
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be mono with shape (samples,), got shape {waveform.shape}; "
                     "downmix channels first (audiomaepp.audio.load_audio does)")
  waveform = waveform.astype(np.float32, copy=False)
  if not np.isfinite(waveform).all():
    raise ValueError("waveform contains NaN or infinite samples")
  return waveform


def log_mel(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE,
            normalize: bool = False) -> np.ndarray:
  """Log-mel spectrogram `(frames, mel)` float32 of a mono waveform `(samples,)`.

  Resamples to 16 kHz first when `sample_rate` differs. With `normalize`, standardises the clip
  like the HEAR runtime of the original (unbiased N-1 std; the training pipeline uses N).
  """
  waveform = io.resample(_check_waveform(waveform), sample_rate)
  if waveform.size < MIN_SAMPLES:
    raise ValueError(f"waveform too short: {waveform.size} samples at {SAMPLE_RATE} Hz, the "
                     f"centred STFT needs at least {MIN_SAMPLES}")
  spec = _log_mel_windows(_frames_of(np.pad(waveform, PAD, mode="reflect")))
  return standardize(spec, ddof=1) if normalize else spec


class LogMelStream:
  """`log_mel` computed block by block over consecutive 16 kHz samples.

  Feed blocks with `update` and call `finish` once; each returns the new frames `(frames, mel)`.
  Concatenated, they equal `log_mel` of the concatenated blocks. Memory: one block plus 400
  samples of context.
  """

  def __init__(self):
    self.num_samples = 0
    self._buffer = np.zeros(0, np.float32)  # samples of the padded signal not yet consumed
    self._started = False  # whether the left reflect padding has been prepended

  def _emit(self) -> np.ndarray:
    if self._buffer.size < N_FFT:
      return np.zeros((0, N_MELS), np.float32)
    frames = _frames_of(self._buffer)
    self._buffer = self._buffer[len(frames) * HOP_LENGTH:]
    return _log_mel_windows(frames)

  def update(self, samples: np.ndarray) -> np.ndarray:
    """Consumes a block of 16 kHz mono samples; returns the frames completed by it."""
    samples = _check_waveform(samples)
    self.num_samples += samples.size
    self._buffer = np.concatenate([self._buffer, samples])
    if not self._started:
      if self._buffer.size < MIN_SAMPLES:
        return np.zeros((0, N_MELS), np.float32)
      # Left reflect padding: x[200], ..., x[1].
      self._buffer = np.concatenate([self._buffer[PAD:0:-1], self._buffer])
      self._started = True
    return self._emit()

  def finish(self) -> np.ndarray:
    """Appends the right reflect padding and returns the remaining frames."""
    if not self._started:
      raise ValueError(f"audio too short: {self.num_samples} samples at {SAMPLE_RATE} Hz, the "
                       f"centred STFT needs at least {MIN_SAMPLES}")
    # Right reflect padding: x[S-2], ..., x[S-201]; the buffer always ends with >= 201 samples of x.
    self._buffer = np.concatenate([self._buffer, self._buffer[-2:-PAD - 2:-1]])
    frames = self._emit()
    self._buffer = np.zeros(0, np.float32)
    return frames


def log_mel_file(path: str, dtype: np.dtype = np.float32) -> np.ndarray:
  """Log-mel `(frames, mel)` of an audio file, decoded and transformed block by block.

  Peak memory is about twice the output (an hour of audio: 360k frames, 58 MB in float16)
  rather than the decoded waveform (230 MB for an hour) and its STFT (over 1 GB). Raises
  `audiomaepp.audio.AudioError` for unreadable files (see `audiomaepp.audio.io`).
  """
  stream = LogMelStream()
  parts = [stream.update(block).astype(dtype) for block in io.iter_audio(path)]
  try:
    parts.append(stream.finish().astype(dtype))
  except ValueError as e:
    raise io.AudioError(f"{os.fspath(path)}: {e}") from e
  return np.concatenate(parts)


def moments(spec: Array, ddof: int = 0) -> tuple[Array, Array]:
  """Per-clip `(mean, std)` over the last two axes `(time, mel)`, kept as `(..., 1, 1)`.

  NumPy input is computed in float32. The shard builder stores these for every clip, so
  `(crop - mean) / (std + STD_EPS)` of any crop equals the crop of `standardize(clip)` exactly.
  """
  if not isinstance(spec, jax.Array):
    spec = np.asarray(spec, np.float32)
  return (spec.mean(axis=(-2, -1), keepdims=True),
          spec.std(axis=(-2, -1), ddof=ddof, keepdims=True))


def standardize(spec: Array, ddof: int = 0) -> Array:
  """Per-clip standardisation `(x - mean) / (std + 1e-8)` over the last two axes `(time, mel)`.

  Works on NumPy (returns float32) and JAX arrays, single clips `(time, mel)` or batches
  `(batch, time, mel)`. `ddof=0` is the original training parser (NumPy std), `ddof=1` its HEAR
  runtime (torch std); the difference is negligible.
  """
  if not isinstance(spec, jax.Array):
    spec = np.asarray(spec, np.float32)
  mean, std = moments(spec, ddof)
  return (spec - mean) / (std + STD_EPS)


@jax.jit
def log_mel_jax(waveforms: jax.Array) -> jax.Array:
  """Batched log-mel: `(batch, samples)` 16 kHz waveforms -> `(batch, frames, mel)` float32."""
  waveforms = jnp.asarray(waveforms, jnp.float32)
  if waveforms.ndim != 2:
    raise ValueError(f"waveforms must have shape (batch, samples), got {waveforms.shape}")
  if waveforms.shape[1] < MIN_SAMPLES:
    raise ValueError(f"waveforms too short: {waveforms.shape[1]} samples, the centred STFT "
                     f"needs at least {MIN_SAMPLES}")
  padded = jnp.pad(waveforms, ((0, 0), (PAD, PAD)), mode="reflect")
  starts = jnp.arange(num_frames(waveforms.shape[1])) * HOP_LENGTH
  frames = padded[:, starts[:, None] + jnp.arange(N_FFT)[None, :]]  # (batch, frames, n_fft)
  spectrum = jnp.fft.rfft(frames * jnp.asarray(_window()), axis=-1)
  power = spectrum.real ** 2 + spectrum.imag ** 2
  # HIGHEST: TPUs would otherwise multiply in bfloat16, far outside the 1e-3 parity budget.
  mel = jnp.einsum("btf,fm->btm", power, jnp.asarray(mel_filterbank()),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(mel + LOG_EPS)
