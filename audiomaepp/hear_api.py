"""The HEAR 2021 common API over AudioMAE++ encoders (docs/reference.md#hear-api).

    model = load_model("WORKDIR")   # a pretraining workdir, an imported original or a model folder
    scene = get_scene_embeddings(audio, model)         # (n_sounds, 5 * width)
    frames, times_ms = get_timestamp_embeddings(audio, model)

Each clip's log-mel is standardised over the whole clip, padded with zeros along time to a whole
number of 200-frame (2 s) chunks and every chunk is encoded without masking. Frame features
concatenate the 5 frequency-patch tokens of each 4-frame (40 ms) time step; frames that came only
from padding are dropped; the scene embedding is their mean. All chunks of all clips go through one
jitted encoder call, with the chunk count rounded up to a power of two (to a multiple of 32 above
32) so that new clip lengths reuse compiled programs.

`frame_layout="original"` reproduces the original code's frequency-major regrouping (its "frames"
are not real time steps; needed only to match numbers produced with the original release).
"""
import dataclasses
import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from audiomaepp import audio as audio_lib
from audiomaepp import checkpointing
from audiomaepp import models
from audiomaepp import native_io
from audiomaepp.audio import features
from audiomaepp.errors import UserError
from audiomaepp.models import config as model_config_lib

SAMPLE_RATE = features.SAMPLE_RATE
FRAME_LAYOUTS = model_config_lib.FRAME_LAYOUTS
# Chunks per encoder call at most; longer inputs (hours of audio) go through in slices of this size
# so memory stays bounded.
MAX_CHUNKS_PER_CALL = 256
# Chunk batches above this size are padded to a multiple of it (`_bucket`).
_STEP = 32
# Audio of shape (samples, c) with c at most this many is taken for one multichannel clip.
_MAX_CHANNELS = 8


@dataclasses.dataclass(frozen=True)
class Model:
  """An encoder ready for the HEAR API: a linen module, its parameters and the frame layout."""
  module: nn.Module
  params: Any
  frame_layout: str
  sample_rate: int = SAMPLE_RATE

  @property
  def chunk_frames(self) -> int:
    return int(self.module.config.input_shape[0])

  @property
  def frames_per_chunk(self) -> int:
    return self.chunk_frames // int(self.module.config.patch_size[0])

  @property
  def scene_embedding_size(self) -> int:
    return self.timestamp_embedding_size

  @property
  def timestamp_embedding_size(self) -> int:
    config = self.module.config
    mel_patches = int(config.input_shape[1]) // int(config.patch_size[1])
    return mel_patches * int(config.width)

  @functools.cached_property
  def _encode_chunks(self):
    """Jitted (chunks, time, mel) -> (chunks, frames, features)."""
    def encode(params, chunks):
      out = self.module.apply({"params": params}, chunks, method=self.module.encode,
                              frame_layout=self.frame_layout)
      return out["frames"].astype(jnp.float32)
    return jax.jit(encode)


def from_variables(model_config: ml_collections.ConfigDict, variables: Any,
                   frame_layout: str = "time_major") -> Model:
  """A HEAR `Model` from a model config and variables (e.g. from `original.load`)."""
  if frame_layout not in FRAME_LAYOUTS:
    raise UserError(f"frame_layout must be one of {FRAME_LAYOUTS}, got {frame_layout!r}")
  module = models.build_model(model_config)
  params = variables["params"] if "params" in variables else variables
  return Model(module=module, params=models.unbox(params), frame_layout=frame_layout)


def load_model(model_file_path: str = "", frame_layout: str = "time_major",
               step: int | None = None) -> Model:
  """Restores the newest intact (or the given `step`) checkpoint of a workdir and its config, or
  the model of a native model folder.

  `model_file_path` is a pretraining workdir (`main.py --workdir`), a directory written by
  `audiomaepp.tools.import_original`, or a folder written by `tools.export --format=native`
  (`native_io`: one step, so `step` must be None). A damaged newest checkpoint is skipped with a
  warning that names the step used instead; `UserError` when none is intact, config.json is
  damaged or a model folder's files are missing or do not match each other.
  """
  if not model_file_path:
    raise UserError("load_model needs a workdir: pass the directory written by main.py or "
                     "audiomaepp.tools.import_original")
  if native_io.is_folder(model_file_path):
    if step is not None:
      raise UserError(f"{model_file_path} is an exported model folder, which holds one step; "
                      f"drop step={step}")
    model_config, params = native_io.read(model_file_path)
    return from_variables(model_config, {"params": params}, frame_layout)
  config = checkpointing.load_config(model_file_path)
  module = models.build_model(config.model)
  abstract = models.abstract_params(module)
  params = checkpointing.restore_params(model_file_path, abstract, step=step)
  return from_variables(config.model, {"params": params}, frame_layout)


def _check_audio(audio: Any) -> jnp.ndarray:
  """The audio as float32 (n_sounds, n_samples); a UserError saying what is wrong otherwise."""
  shape = tuple(np.shape(audio))
  expected = "expected (n_sounds, n_samples): a batch of 16 kHz mono waveforms"
  if len(shape) != 2:
    hint = "; add a batch axis for one clip: audio[None]" if len(shape) == 1 else ""
    raise UserError(f"audio has shape {shape}: {expected}{hint}")
  n_sounds, n_samples = shape
  if n_sounds == 0:
    raise UserError(f"audio has shape {shape}, an empty batch: {expected}, at least one sound")
  if n_samples == 0:
    raise UserError(f"audio has shape {shape}, zero samples per sound: {expected}")
  if n_samples <= _MAX_CHANNELS and n_sounds >= features.MIN_SAMPLES:
    raise UserError(
        f"audio has shape {shape}, which looks like one clip of {n_sounds} samples with "
        f"{n_samples} channels: {expected}; downmix and add a batch axis: audio.mean(axis=1)[None]")
  if n_samples < features.MIN_SAMPLES:
    raise UserError(f"audio too short: {n_samples} samples per sound, the log-mel needs at least "
                    f"{features.MIN_SAMPLES} (shape {shape}; {expected})")
  audio = jnp.asarray(audio, jnp.float32)
  finite = np.asarray(jnp.all(jnp.isfinite(audio), axis=1))
  if not finite.all():
    bad = np.flatnonzero(~finite).tolist()
    raise UserError(f"audio of sounds {bad} contains NaN or infinite samples")
  return audio


@jax.jit
def _standardised_log_mel(audio: jnp.ndarray) -> jnp.ndarray:
  """(n_sounds, samples) -> (n_sounds, frames, mel), standardised per clip (unbiased std)."""
  return features.standardize(audio_lib.log_mel_jax(audio), ddof=1)


def _bucket(n: int) -> int:
  """The chunk-batch size compiled for `n` chunks: the next power of two up to `_STEP`, then the
  next multiple of `_STEP` (at most MAX_CHUNKS_PER_CALL / _STEP programs; padding up to the next
  power of two wasted up to half of the encoder's work on a split's last call)."""
  if n <= _STEP:
    return 1 << max(0, (n - 1).bit_length())
  return min(MAX_CHUNKS_PER_CALL, -(-n // _STEP) * _STEP)


def log_mel_chunks(audio: Any, chunk_frames: int) -> Tuple[jnp.ndarray, int, int]:
  """The encoder's inputs for a batch of clips: (n_sounds · n_chunks, chunk_frames, mel)
  standardised log-mel chunks (zero-padded along time), n_chunks per clip and the number of
  padding frames at the end of each clip. UserError for audio the API does not take."""
  audio = _check_audio(audio)
  spectrogram = _standardised_log_mel(audio)
  # Finite samples can still overflow the float32 power spectrum (e.g. 1e20 from corrupt float
  # data); their embeddings would be NaN.
  finite = np.asarray(jnp.all(jnp.isfinite(spectrogram), axis=(1, 2)))
  if not finite.all():
    bad = np.flatnonzero(~finite).tolist()
    peak = float(jnp.max(jnp.abs(audio[np.asarray(bad)])))
    raise UserError(f"audio of sounds {bad} has samples of magnitude {peak:.3g}, which overflow "
                     "the float32 log-mel; expected 16 kHz waveforms in [-1, 1]")
  n_sounds, n_time, n_mel = spectrogram.shape
  n_chunks = -(-n_time // chunk_frames)
  pad = n_chunks * chunk_frames - n_time
  spectrogram = jnp.pad(spectrogram, ((0, 0), (0, pad), (0, 0)))
  return spectrogram.reshape(n_sounds * n_chunks, chunk_frames, n_mel), n_chunks, pad


def real_frames(frames: Any, n_sounds: int, pad: int, patch_time: int) -> Any:
  """Encoder frames of all chunks (n_sounds · n_chunks, frames_per_chunk, features) -> per clip
  (n_sounds, n_frames, features), without the frames that came only from the `pad` padding
  log-mel frames (`patch_time` log-mel frames per encoder frame)."""
  frames = frames.reshape(n_sounds, -1, frames.shape[-1])
  return frames[:, :frames.shape[1] - pad // patch_time]


def _frame_embeddings(audio: Any, model: Model) -> Tuple[jnp.ndarray, int]:
  """(n_sounds, n_frames, features) for real (unpadded) frames and the number of frames."""
  chunks, _, pad = log_mel_chunks(audio, model.chunk_frames)
  frames = encode_chunks(chunks, np.shape(audio)[0], pad, model)
  return frames, frames.shape[1]


def encode_chunks(chunks: Any, n_sounds: int, pad: int, model: Model) -> jnp.ndarray:
  """Encoder frames per clip (n_sounds, n_frames, features) of the log-mel chunks of
  `log_mel_chunks` (clip by clip, `pad` padding frames per clip), without the padding's frames."""
  outputs = []
  for start in range(0, chunks.shape[0], MAX_CHUNKS_PER_CALL):
    piece = chunks[start:start + MAX_CHUNKS_PER_CALL]
    size = _bucket(piece.shape[0])
    padded = jnp.pad(piece, ((0, size - piece.shape[0]), (0, 0), (0, 0)))
    outputs.append(model._encode_chunks(model.params, padded)[:piece.shape[0]])
  return real_frames(jnp.concatenate(outputs), n_sounds, pad,
                     model.chunk_frames // model.frames_per_chunk)


def get_timestamp_embeddings(audio: Any, model: Model) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Per-frame embeddings (n_sounds, n_frames, 5·width) and their times in ms (n_sounds, n_frames)."""
  frames, n_frames = _frame_embeddings(audio, model)
  duration_s = np.shape(audio)[1] / model.sample_rate
  times = jnp.arange(n_frames, dtype=jnp.float32) * (duration_s / n_frames) * 1000.0
  return frames, jnp.broadcast_to(times, frames.shape[:2])


def get_scene_embeddings(audio: Any, model: Model) -> jnp.ndarray:
  """Clip embeddings (n_sounds, 5·width): the mean of the frame embeddings over time."""
  frames, _ = _frame_embeddings(audio, model)
  return frames.mean(axis=1)
