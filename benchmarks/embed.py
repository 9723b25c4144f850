r"""HEAR embedding throughput: clips/s of `hear_api.get_scene_embeddings` on 10-s clips.

    python benchmarks/embed.py --config=configs/base.py [--dtype=bfloat16] [--clips=8,32] \
        [--clip_seconds=10] [--repeats=5] [--output=FILE]
    python benchmarks/embed.py --workdir=WORKDIR ...     # a trained or imported model

The model is randomly initialised from the config (throughput does not depend on the weights) or
restored from a workdir. Each call gets a (clips, samples) NumPy array of random audio, as a HEAR
harness passes it, and includes everything the API does: the host-to-device copy, the log-mel,
the chunking and the encoder. The first call compiles; it is reported separately and the rate is
the median of the later calls. The encoder sees 200-frame chunks (6 per 10-s clip) in batches
rounded up to a power of two (at most `hear_api.MAX_CHUNKS_PER_CALL`), so the table also shows the
chunks actually encoded and the encoder's achieved TFLOP/s over them.
"""
import math
import statistics
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

import common
from audiomaepp import hear_api
from audiomaepp import metrics
from audiomaepp import models

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (the model is "
                                          "randomly initialised).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Restore the model from this workdir instead.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (overrides config.model.dtype; --config only).")
_FRAME_LAYOUT = flags.DEFINE_enum("frame_layout", "time_major", list(hear_api.FRAME_LAYOUTS),
                                  "Per-frame feature layout.")
_CLIPS = flags.DEFINE_list("clips", ["8"], "Clips per get_scene_embeddings call (a list sweeps).")
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 10.0, "Length of each clip in seconds.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after the first; the median counts.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")


def random_model(model_config: Any, frame_layout: str) -> hear_api.Model:
  """A HEAR model with randomly initialised parameters for `model_config`."""
  module = models.build_model(model_config)
  input_shape = tuple(module.config.input_shape)
  key = jax.random.PRNGKey(0)
  variables = jax.jit(module.init)({"params": key, "masking": key},
                                   np.zeros((1, *input_shape), np.float32))
  return hear_api.from_variables(model_config, variables, frame_layout)


def encoded_chunks(num_chunks: int) -> int:
  """Chunks the encoder actually runs for `num_chunks` real ones (power-of-two buckets)."""
  total = 0
  for start in range(0, num_chunks, hear_api.MAX_CHUNKS_PER_CALL):
    piece = min(hear_api.MAX_CHUNKS_PER_CALL, num_chunks - start)
    total += 1 << max(0, (piece - 1).bit_length())
  return total


def measure(model: hear_api.Model, clips: int, clip_seconds: float, repeats: int,
            peak_flops: float | None) -> dict[str, Any]:
  """Times `get_scene_embeddings` on (clips, clip_seconds * 16 kHz) random audio."""
  samples = int(round(clip_seconds * model.sample_rate))
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, (clips, samples)).astype(np.float32)
  call = lambda: hear_api.get_scene_embeddings(audio, model)
  first_s = common.timed(call)
  steady = [common.timed(call) for _ in range(repeats)]
  call_s = statistics.median(steady)
  embeddings = np.asarray(call())
  # hear_api pads the log-mel frames (1 + samples // hop) to whole chunks.
  frames = 1 + samples // 160
  chunks_per_clip = math.ceil(frames / model.chunk_frames)
  encoded = encoded_chunks(clips * chunks_per_clip)
  encoder_flops = encoded * models.encode_flops_per_sample(model.module.config) / call_s
  return {
      "clips": clips, "first_call_s": first_s, "compile_s": max(0.0, first_s - call_s),
      "call_s": call_s, "call_s_all": steady, "clips_per_s": clips / call_s,
      "audio_s_per_s": clips * clip_seconds / call_s, "chunks_per_clip": chunks_per_clip,
      "chunks_encoded": encoded, "bucket_padding": encoded / (clips * chunks_per_clip),
      "encoder_flops_per_s": encoder_flops / jax.device_count(),
      "encoder_mfu": encoder_flops / jax.device_count() / peak_flops if peak_flops else None,
      "embedding_shape": list(embeddings.shape),
      "embeddings_finite": bool(np.isfinite(embeddings).all()),
  }


COLUMNS = (
    ("clips", "clips/call", "d"),
    ("first_call_s", "first call s", ".2f"),
    ("compile_s", "compile s (≈)", ".2f"),
    ("call_s", "call s", ".3f"),
    ("clips_per_s", "clips/s", common.rate),
    ("audio_s_per_s", "audio s/s", ",.0f"),
    ("chunks_encoded", "chunks encoded", "d"),
    ("bucket_padding", "bucket padding", ".2f"),
    ("encoder_flops_per_s", "encoder TFLOP/s", lambda f: f"{f / 1e12:.3f}"),
    ("encoder_mfu", "encoder MFU", ".1%"),
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if (_CONFIG.value is None) == (_WORKDIR.value is None):
    raise app.UsageError("pass exactly one of --config=configs/NAME.py and --workdir=DIR")
  if _WORKDIR.value and _DTYPE.value:
    raise app.UsageError("--dtype applies to --config models; a workdir keeps its recorded dtype")
  try:
    clip_counts = [int(c) for c in _CLIPS.value]
  except ValueError:
    raise app.UsageError(f"--clips={','.join(_CLIPS.value)}: expected integers")
  if not clip_counts or min(clip_counts) <= 0 or _REPEATS.value <= 0:
    raise app.UsageError("--clips and --repeats must be positive")
  env = common.environment()
  if _WORKDIR.value:
    model = hear_api.load_model(_WORKDIR.value, _FRAME_LAYOUT.value)
    source = _WORKDIR.value
  else:
    config = _CONFIG.value
    if _DTYPE.value:
      with config.unlocked():
        config.model.dtype = _DTYPE.value
    model = random_model(config.model, _FRAME_LAYOUT.value)
    source = f"{config_flags.get_config_filename(flags.FLAGS['config'])} (random init)"
  peak = metrics.peak_flops_per_device(env["device_kind"])
  results = [measure(model, clips, _CLIP_SECONDS.value, _REPEATS.value, peak)
             for clips in clip_counts]
  c = model.module.config
  record = {"benchmark": "embed", "environment": env, "model_source": source,
            "model": {"size": c.size, "width": c.width, "depth": c.depth, "dtype": c.dtype,
                      "attention_impl": c.attention_impl, "frame_layout": model.frame_layout,
                      "embedding_size": model.scene_embedding_size},
            "clip_seconds": _CLIP_SECONDS.value, "repeats": _REPEATS.value,
            "peak_flops": peak, "results": results}
  print(f"HEAR scene embeddings: {source}, {c.dtype}, {model.scene_embedding_size}-d, "
        f"{_CLIP_SECONDS.value:g}-s clips")
  print(common.describe(env))
  print(common.table(results, COLUMNS))
  common.write_json(_OUTPUT.value, record)


if __name__ == "__main__":
  app.run(main)
