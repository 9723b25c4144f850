r"""Log-mel throughput in seconds of audio per second: NumPy (in memory, streamed) and JAX.

    python benchmarks/logmel.py [--clip_seconds=10] [--batch=64] [--repeats=5] [--output_json=FILE]

NumPy: `log_mel` on one clip at a time (the shard builder's per-process rate) and
`LogMelStream` fed 1 s blocks. JAX: jitted `log_mel_jax` on a (batch, samples) array on the
default device, compilation excluded.
"""
import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from audiomaepp import audio

_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 10.0, "Length of each clip.")
_BATCH = flags.DEFINE_integer("batch", 64, "Clips per JAX call (and NumPy clips per repeat).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the best is reported.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the numbers here.")


def _best_seconds(fn, repeats: int) -> float:
  fn()  # warm-up: caches, jit compilation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _stream(clip: np.ndarray) -> np.ndarray:
  stream = audio.LogMelStream()
  parts = [stream.update(clip[i:i + 16000]) for i in range(0, clip.size, 16000)]
  return np.concatenate(parts + [stream.finish()])


def main(argv):
  del argv
  samples = int(_CLIP_SECONDS.value * 16000)
  clips = np.random.default_rng(0).uniform(-0.5, 0.5, (_BATCH.value, samples)).astype(np.float32)
  audio_seconds = _BATCH.value * _CLIP_SECONDS.value
  on_device = jax.device_put(clips)
  timings = {
      "numpy_log_mel": lambda: [audio.log_mel(c) for c in clips],
      "numpy_stream": lambda: [_stream(c) for c in clips],
      "jax_log_mel": lambda: audio.log_mel_jax(on_device).block_until_ready(),
  }
  results = {"device": jax.devices()[0].device_kind, "clip_seconds": _CLIP_SECONDS.value,
             "batch": _BATCH.value}
  print(f"{'implementation':<16} {'audio s / s':>12}   ({results['device']}, "
        f"{_BATCH.value} clips of {_CLIP_SECONDS.value:g} s)")
  for name, fn in timings.items():
    rate = audio_seconds / _best_seconds(fn, _REPEATS.value)
    results[name] = rate
    print(f"{name:<16} {rate:>12,.0f}")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
