"""Log-mel features and audio decoding against the original's torchaudio output and librosa."""
import tracemalloc

import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile as sf

from audiomaepp import audio

CLIPS = ("chirp_3p7s", "short_0p5s", "exact_2s", "sweep_10s_with_silence")
PARITY = 1e-3  # max abs error allowed against the fixture (issue 3)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  with np.load(fixtures_dir / "logmel_reference.npz") as z:
    return dict(z)


def _tone(seconds, rate=16000, freq=440.0, channels=1, seed=0):
  t = np.arange(int(seconds * rate)) / rate
  rng = np.random.default_rng(seed)
  columns = [0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.01 * rng.standard_normal(t.size)
             for c in range(channels)]
  return np.stack(columns, axis=1).astype(np.float32) if channels > 1 else columns[0].astype(
      np.float32)


@pytest.mark.parametrize("clip", CLIPS)
def test_numpy_log_mel_matches_original(reference, clip):
  wav = reference[f"audio__{clip}"]
  raw = audio.log_mel(wav)
  assert raw.shape == reference[f"logmel_raw__{clip}"].shape == (1 + wav.size // 160, 80)
  assert raw.dtype == np.float32
  np.testing.assert_allclose(raw, reference[f"logmel_raw__{clip}"], rtol=0, atol=PARITY)
  np.testing.assert_allclose(audio.log_mel(wav, normalize=True),
                             reference[f"logmel_normalized__{clip}"], rtol=0, atol=PARITY)


@pytest.mark.parametrize("clip", CLIPS)
def test_jax_log_mel_matches_original_and_numpy(reference, clip):
  wav = reference[f"audio__{clip}"]
  batch = np.stack([wav, wav[::-1]])  # two different clips of one length
  out = np.asarray(audio.log_mel_jax(batch))
  assert out.shape == (2,) + reference[f"logmel_raw__{clip}"].shape
  np.testing.assert_allclose(out[0], reference[f"logmel_raw__{clip}"], rtol=0, atol=PARITY)
  np.testing.assert_allclose(np.asarray(audio.standardize(audio.log_mel_jax(batch), ddof=1))[0],
                             reference[f"logmel_normalized__{clip}"], rtol=0, atol=PARITY)
  np.testing.assert_allclose(out[1], audio.log_mel(wav[::-1]), rtol=0, atol=PARITY)


def test_log_mel_matches_librosa_melspectrogram():
  wav = np.random.default_rng(1).standard_normal(16000 * 3 + 77).astype(np.float32) * 0.1
  power = librosa.feature.melspectrogram(
      y=wav, sr=16000, n_fft=400, hop_length=160, win_length=400, window="hann", center=True,
      pad_mode="reflect", power=2.0, n_mels=80, fmin=50, fmax=8000, htk=True, norm=None)
  expected = np.log(power + np.finfo(np.float32).eps).T
  np.testing.assert_allclose(audio.log_mel(wav), expected, rtol=0, atol=1e-4)
  np.testing.assert_allclose(
      audio.mel_filterbank(),
      librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000, htk=True,
                          norm=None).T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("samples", [201, 399, 400, 32000, 32159, 32160])
def test_frame_count(samples):
  wav = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
  assert audio.log_mel(wav).shape == (1 + samples // 160, 80) == (audio.num_frames(samples), 80)


def test_too_short_and_bad_waveforms_rejected():
  with pytest.raises(ValueError, match="at least 201"):
    audio.log_mel(np.zeros(200, np.float32))
  with pytest.raises(ValueError, match="NaN"):
    audio.log_mel(np.full(1000, np.nan, np.float32))
  with pytest.raises(ValueError, match=r"\(samples,\)"):
    audio.log_mel(np.zeros((1000, 2), np.float32))


def test_standardize_per_clip_numpy_and_jax():
  spec = np.random.default_rng(0).normal(3.0, 2.0, size=(3, 50, 80)).astype(np.float32)
  spec[1] *= 10
  for ddof in (0, 1):
    out = audio.standardize(spec, ddof=ddof)
    for clip in range(3):
      flat = spec[clip].ravel().astype(np.float64)
      expected = (spec[clip] - flat.mean()) / (flat.std(ddof=ddof) + 1e-8)
      np.testing.assert_allclose(out[clip], expected, rtol=0, atol=1e-5)
      np.testing.assert_allclose(audio.standardize(spec[clip], ddof=ddof), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(audio.standardize(jnp.asarray(spec), ddof=ddof)),
                               out, atol=1e-5)


def test_streaming_equals_in_memory_for_any_block_size():
  wav = _tone(2.37, seed=3)
  expected = audio.log_mel(wav)
  rng = np.random.default_rng(0)
  for _ in range(3):
    stream = audio.LogMelStream()
    cuts = np.sort(rng.choice(np.arange(1, wav.size), size=40, replace=False))
    parts = [stream.update(block) for block in np.split(wav, cuts)] + [stream.finish()]
    np.testing.assert_allclose(np.concatenate(parts), expected, rtol=0, atol=1e-5)
    assert stream.num_samples == wav.size


def test_load_audio_downmixes_and_resamples_like_librosa(tmp_path):
  stereo = _tone(1.5, rate=44100, channels=2)
  path = tmp_path / "stereo.flac"
  sf.write(path, stereo, 44100, subtype="PCM_24")
  decoded, _ = sf.read(path, dtype="float32")
  wav = audio.load_audio(str(path))
  expected = librosa.resample(decoded.mean(axis=1), orig_sr=44100, target_sr=16000,
                              res_type="soxr_hq")
  assert wav.dtype == np.float32 and wav.shape == expected.shape == (24000,)
  np.testing.assert_allclose(wav, expected, rtol=0, atol=1e-4)
  assert audio.audio_info(str(path)).conversions() == [
      "downmixed 2 channels to mono", "resampled 44100 Hz to 16000 Hz"]
  np.testing.assert_allclose(audio.log_mel_file(str(path)), audio.log_mel(expected), atol=1e-3)
  np.testing.assert_allclose(audio.log_mel(decoded.mean(axis=1), sample_rate=44100),
                             audio.log_mel(expected), atol=1e-3)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_formats_decode(tmp_path, fmt):
  wav = _tone(1.0)
  path = tmp_path / f"clip.{fmt.lower()}"
  sf.write(path, wav, 16000, format=fmt)
  decoded = audio.load_audio(str(path))
  if fmt in ("WAV", "FLAC"):  # lossless up to 16-bit quantisation
    np.testing.assert_allclose(decoded, wav, atol=1 / 2 ** 15)
  else:  # lossy codecs: same length (within codec padding) and strongly correlated
    assert abs(decoded.size - wav.size) < 2048
    n = min(decoded.size, wav.size)
    assert np.corrcoef(decoded[:n], wav[:n])[0, 1] > 0.9


def test_bad_files_raise_audio_error_naming_the_file(tmp_path):
  good = tmp_path / "good.flac"
  sf.write(good, _tone(3.0), 16000)
  data = good.read_bytes()
  nan = _tone(1.0)
  nan[5000] = np.nan
  cases = {
      "empty.wav": (lambda p: p.write_bytes(b""), "empty file"),
      "noise.wav": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), "undecodable"),
      "cut.flac": (lambda p: p.write_bytes(data[:len(data) // 2]), "truncated"),
      "nan.wav": (lambda p: sf.write(p, nan, 16000, subtype="FLOAT"), "non-finite"),
      "silent.wav": (lambda p: sf.write(p, np.zeros(0, np.float32), 16000), "no audio samples"),
      "absent.wav": (lambda p: None, "no such file"),
  }
  for name, (make, reason) in cases.items():
    path = tmp_path / name
    make(path)
    with pytest.raises(audio.AudioError, match=reason) as info:
      audio.load_audio(str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
  with pytest.raises(audio.AudioError, match="non-finite"):
    audio.log_mel_file(str(tmp_path / "nan.wav"))


def test_log_mel_file_rejects_files_shorter_than_one_window(tmp_path):
  path = tmp_path / "tiny.wav"
  sf.write(path, _tone(0.01), 16000)  # 160 samples
  with pytest.raises(audio.AudioError, match="tiny.wav.*too short"):
    audio.log_mel_file(str(path))


@pytest.mark.integration
def test_hour_long_file_streams_with_bounded_memory(tmp_path):
  """One hour at 16 kHz: the float32 waveform alone would take 230 MB."""
  path = tmp_path / "hour.wav"
  with sf.SoundFile(path, "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
    minute = _tone(60.0)
    for _ in range(60):
      f.write(minute)
  tracemalloc.start()
  spec = audio.log_mel_file(str(path), dtype=np.float16)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert spec.shape == (1 + 3600 * 16000 // 160, 80) and spec.dtype == np.float16
  # The output (58 MB) and its parts before concatenation, plus one 30 s block.
  assert peak < 2 * spec.nbytes + 20e6, f"peak traced memory {peak / 1e6:.0f} MB"
  first_minute, _ = sf.read(path, frames=60 * 16000, dtype="float32")
  path.unlink()  # 115 MB
  # Frames 0..5998 lie inside the first minute (frame i spans samples 160 i +- 200).
  np.testing.assert_allclose(spec[:5999].astype(np.float32), audio.log_mel(first_minute)[:5999],
                             atol=0.02)
