"""Baseline scene embeddings that give every task a floor to compare models against."""
import numpy as np

from audiomaepp.audio import features


def logmel_stats(waveforms: np.ndarray) -> np.ndarray:
  """Per-clip log-mel mean and standard deviation over time: (clips, samples) 16 kHz audio ->
  (clips, 2 * mel) float32, the means first. The classic weak baseline of audio benchmarks."""
  rows = []
  for waveform in np.asarray(waveforms, np.float32):
    spec = features.log_mel(waveform)
    rows.append(np.concatenate([spec.mean(0), spec.std(0)]))
  return np.stack(rows).astype(np.float32)


# Name -> (function of (clips, samples) audio, embedding size).
BASELINES = {"logmel_stats": (logmel_stats, 2 * features.N_MELS)}
