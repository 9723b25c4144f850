"""The bad-audio zoo through the shard builder and the HEAR API (docs/reliability.md).

The builder must finish and account for every file (written, with its conversions, or skipped
with its reason); the HEAR API must return finite embeddings or raise an error naming the problem,
and never hang. The hour-long clips are slow tests: each runs in a subprocess that reports its
own peak resident memory (VmHWM).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from audiomaepp import audio
from audiomaepp import hear_api
from audiomaepp import original
from audiomaepp.data import builders
from audiomaepp.data import sources
from audiomaepp.tools import prepare_dataset
import faults

REPO = pathlib.Path(__file__).resolve().parents[1]
# huge_floats.wav: NumPy warns about the overflow the builder then reports.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
EMBEDDING_SIZE = 5 * 64  # the micro fixture model: 5 frequency patches x width 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  folder = tmp_path_factory.mktemp("zoo") / "audio"
  return folder, faults.write_audio_zoo(folder)


@pytest.fixture(scope="module")
def zoo_build(zoo, tmp_path_factory):
  folder, _ = zoo
  builder, report = builders.build(sources.Sources(str(folder), eval_fraction=0.0),
                                   str(tmp_path_factory.mktemp("zoo_tfds")), progress=False)
  return pathlib.Path(builder.data_path), report


@pytest.fixture(scope="module")
def micro(fixtures_dir):
  return hear_api.from_variables(*original.load(fixtures_dir / "maepp_micro_weights.npz",
                                                fixtures_dir / "maepp_micro_config.json"))


@pytest.mark.timeout(120)
def test_builder_completes_and_reports_every_zoo_file(zoo, zoo_build):
  _, expected = zoo
  dataset_dir, report = zoo_build
  skipped = {s["file"]: s["reason"] for s in report["skipped_files"]}
  must_skip = {name for name, (outcome, _) in expected.items() if outcome != "write"}
  assert set(skipped) == must_skip
  for name in must_skip:
    assert expected[name][1] in skipped[name], (name, skipped[name])
  assert (report["seen"], report["written"], report["skipped"]) == (len(expected), 4, 7)
  assert report["conversions"] == {"downmixed 2 channels to mono": 1,
                                   "resampled 8000 Hz to 16000 Hz": 1,
                                   "resampled 48000 Hz to 16000 Hz": 1}
  assert json.loads((dataset_dir / builders.REPORT_FILE).read_text()) == report
  # The CLI's summary names every skipped file with its reason.
  summary = prepare_dataset.summary(report, max_listed=len(expected))
  for name, reason in skipped.items():
    assert f"skipped {name}: {reason}" in summary


@pytest.mark.timeout(120)
def test_written_zoo_records_are_finite_full_length_log_mels(zoo, zoo_build):
  _, expected = zoo
  dataset_dir, _ = zoo_build
  source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split="train")
  records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == sorted(n for n, (o, _) in expected.items() if o == "write")
  samples = int(faults.CLIP_SECONDS * 16000)
  for name, record in records.items():
    spectrogram = record["spectrogram"].astype(np.float32)
    assert spectrogram.shape == (1 + samples // 160, 80), name
    assert np.isfinite(spectrogram).all(), name
    assert record["duration"] == pytest.approx(faults.CLIP_SECONDS), name
  # Silence is the log of the float32 epsilon everywhere, not -inf.
  np.testing.assert_allclose(records["silence.wav"]["spectrogram"].astype(np.float32),
                             np.log(np.finfo(np.float32).eps), rtol=1e-3)
  # Resampled and downmixed clips keep the tone: the same log-mel as the 16 kHz original
  # where the tone's energy is (the 440 Hz mel bin).
  reference = audio.log_mel(faults.tone(faults.CLIP_SECONDS))
  peak_bin = int(np.argmax(reference[10:-10].mean(axis=0)))
  for name, gain in (("rate_8k.wav", 1.0), ("stereo_48k.flac", 0.75)):
    got = records[name]["spectrogram"].astype(np.float32)[10:-10, peak_bin]
    np.testing.assert_allclose(got, reference[10:-10, peak_bin] + 2 * np.log(gain), atol=0.1)


@pytest.mark.timeout(120)
def test_hear_api_on_loaded_zoo_files_is_finite_or_names_the_problem(zoo, micro):
  folder, expected = zoo
  for name, (outcome, detail) in expected.items():
    path = str(folder / name)
    if outcome == "skip" and not name.startswith("short"):
      with pytest.raises(audio.AudioError) as error:
        audio.load_audio(path)
      assert path in str(error.value) and detail.split(":")[0] in str(error.value)
      continue
    waveform = audio.load_audio(path)
    if outcome == "overflow":
      with pytest.raises(ValueError, match=r"sounds \[0\].*magnitude"):
        hear_api.get_scene_embeddings(waveform[None], micro)
      continue
    scene = np.asarray(hear_api.get_scene_embeddings(waveform[None], micro))
    frames, times = hear_api.get_timestamp_embeddings(waveform[None], micro)
    assert scene.shape == (1, EMBEDDING_SIZE) and np.isfinite(scene).all(), name
    assert np.isfinite(np.asarray(frames)).all() and np.isfinite(np.asarray(times)).all(), name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make,message", [
    (lambda: np.full((2, 16000), np.nan, np.float32), r"sounds \[0, 1\] contains NaN or inf"),
    (lambda: np.array([[0.1] * 16000, [0.0] * 15999 + [np.inf]], np.float32),
     r"sounds \[1\] contains NaN or inf"),
    (lambda: np.stack([faults.tone(1.0), 1e20 * faults.tone(1.0)]),
     r"sounds \[1\].*magnitude 3e\+19.*\[-1, 1\]"),
    (lambda: np.full((1, 16000), np.finfo(np.float32).max, np.float32), r"sounds \[0\]"),
    (lambda: np.zeros((1, 100), np.float32), "too short: 100 samples"),
    (lambda: np.zeros((1, 0), np.float32), "zero samples"),
    (lambda: np.zeros((1, 2, 16000), np.float32), r"\(n_sounds, n_samples\)"),
], ids=["all_nan", "one_inf", "huge_floats", "float32_max", "100_samples", "empty", "3d"])
def test_hear_api_raw_bad_arrays_raise_a_clear_error(micro, make, message):
  with pytest.raises(ValueError, match=message):
    hear_api.get_scene_embeddings(make(), micro)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make", [
    lambda: np.zeros((1, 24000), np.float32),  # silence
    lambda: np.full((1, 24000), 0.5, np.float32),  # DC offset: a constant log-mel
    lambda: faults.tone(0.05)[None],  # 0.05 s: one chunk, mostly padding
    lambda: np.random.default_rng(0).normal(size=(1, 201)).astype(np.float32),  # one STFT window
    lambda: 1e-30 * faults.tone(1.5)[None],  # far below the log floor
    lambda: 3e4 * faults.tone(1.5)[None],  # int16-scaled floats
], ids=["silence", "dc", "0.05s", "201_samples", "1e-30", "int16_scale"])
def test_hear_api_degenerate_but_valid_audio_gives_finite_embeddings(micro, make):
  scene = np.asarray(hear_api.get_scene_embeddings(make(), micro))
  assert scene.shape == (1, EMBEDDING_SIZE) and np.isfinite(scene).all()


def _peak_rss_growth(code: str, timeout: int) -> dict:
  """Runs `code` in a fresh interpreter after its imports and returns its JSON result plus the
  growth of peak resident memory (VmHWM) over the resident memory before `code` ran."""
  script = f"""
import json, sys
def status(key):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
import numpy as np
from audiomaepp import audio, hear_api, original
from audiomaepp.data import builders, sources
sys.path.insert(0, {str(REPO / 'tests')!r})
import faults
before = status('VmRSS')
result = {{}}
{code}
result['growth'] = status('VmHWM') - before
print(json.dumps(result))
"""
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_long_48k_stereo_clip_builds_with_bounded_memory(tmp_path):
  """Streamed: the decoded float32 waveform alone (48 kHz stereo, 1 h) would take 1.4 GB."""
  folder = tmp_path / "audio"
  folder.mkdir()
  faults.write_long_file(folder / "hour.flac", 3600, rate=48000, channels=2)
  faults.write_long_file(folder / "minute.flac", 60, rate=48000, channels=2)
  code = f"""
builder, report = builders.build(sources.Sources({str(folder)!r}, eval_fraction=0.0),
                                 {str(tmp_path / 'tfds')!r}, progress=False)
result['report'] = report
"""
  result = _peak_rss_growth(code, timeout=800)
  report = result["report"]
  assert (report["written"], report["skipped"]) == (2, 0)
  assert report["total_duration_s"] == pytest.approx(3660.0)
  decoded_bytes = 3600 * 48000 * 2 * 4
  record_bytes = (1 + 3600 * 16000 // 160) * 80 * 2  # float16 log-mel: 58 MB
  # TFDS holds a few serialized copies of the (58 MB) record; nothing scales with the input.
  assert result["growth"] < min(decoded_bytes / 2, 10 * record_bytes), result["growth"] / 1e6


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hour_long_clip_through_hear_api_has_bounded_memory(tmp_path, fixtures_dir):
  """load_audio + get_scene_embeddings of 1 h vs 512 s (256 chunks, one full encoder slice): the
  extra memory is a few copies of the extra waveform (measured: 3x, from load_audio's blocks and
  the log-mel), not the encoder on 1800 chunks at once (gigabytes for the micro model)."""
  path = tmp_path / "clip.flac"
  code = f"""
import time
model = hear_api.from_variables(*original.load({str(fixtures_dir / 'maepp_micro_weights.npz')!r},
                                               {str(fixtures_dir / 'maepp_micro_config.json')!r}))
waveform = audio.load_audio({str(path)!r})
start = time.time()
scene = np.asarray(hear_api.get_scene_embeddings(waveform[None], model))
result.update(seconds=time.time() - start, finite=bool(np.isfinite(scene).all()),
              shape=list(scene.shape), samples=int(waveform.size))
"""
  results = {}
  for seconds in (512, 3600):
    faults.write_long_file(path, seconds)
    results[seconds] = _peak_rss_growth(code, timeout=800)
    assert results[seconds]["finite"] and results[seconds]["shape"] == [1, EMBEDDING_SIZE]
    assert results[seconds]["samples"] == seconds * 16000
  extra_waveform_bytes = (3600 - 512) * 16000 * 4
  extra = results[3600]["growth"] - results[512]["growth"]
  assert extra < 5 * extra_waveform_bytes, (extra / 1e6, results)
  assert results[3600]["seconds"] < 300, results
