"""Audio decoding and log-mel features (docs/reference.md#features)."""
from audiomaepp.audio.features import (LogMelStream, log_mel, log_mel_file, log_mel_jax,
                                       mel_filterbank, moments, num_frames, standardize)
from audiomaepp.audio.io import AudioError, AudioInfo, audio_info, iter_audio, load_audio, resample
