"""The built-in corpus of real recordings: streams cut into clips, the cap, missing packages."""
import csv
import hashlib
import os

import numpy as np
import pytest
import soundfile as sf

from audiomaepp.data import real
from audiomaepp.errors import UserError

RATE = real.SAMPLE_RATE


def _wav(path, seconds, level, rate=RATE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  waveform = np.full(int(seconds * rate), level, np.float32)
  sf.write(path, waveform, rate, subtype="FLOAT" if path.endswith(".wav") else "PCM_16")
  return path


def test_files_are_joined_with_gaps_and_cut_into_clips(tmp_path):
  files = [_wav(str(tmp_path / f"{i}.wav"), 4.0, level) for i, level in enumerate((0.1, -0.3, 0.45))]
  silent = _wav(str(tmp_path / "silent.wav"), 1.0, 0.0)
  broken = str(tmp_path / "broken.wav")
  with open(broken, "wb") as f:
    f.write(b"RIFF not audio")
  clips = list(real.stream_clips([files[0], silent, broken, files[1], files[2]]))
  # 3 x (4 s + 0.25 s gap) = 12.75 s: one 10-s clip and the 2.75-s rest (>= MIN_CLIP_S)
  assert [len(c) for c in clips] == [10 * RATE, int(2.75 * RATE)]
  stream = np.concatenate(clips)
  gap = int(real.GAP_S * RATE)
  expected = np.concatenate([np.r_[np.full(4 * RATE, s * 0.9, np.float32), np.zeros(gap)]
                             for s in (1, -1, 1)])  # each file peak-normalised to 0.9
  np.testing.assert_allclose(stream, expected, atol=1e-6)


def test_a_short_rest_is_dropped(tmp_path):
  files = [_wav(str(tmp_path / "a.wav"), 11.0, 0.5, rate=8000)]  # resampled to 16 kHz
  assert [len(c) for c in real.stream_clips(files)] == [10 * RATE]  # 1.25 s rest < 2 s


def _sources(tmp_path):
  sources = (
      real.Source("talk", "speech", "pkg-speech", str(tmp_path / "speech")),
      real.Source("tune", "music", "pkg-music", str(tmp_path / "music*")),
  )
  for i in range(3):
    _wav(str(tmp_path / "speech" / "sub" / f"{i}.wav"), 5.0, 0.2)
  _wav(str(tmp_path / "music1" / "song.flac"), 25.0, 0.3)
  return sources


def test_write_corpus_labels_and_caps_by_id_hash(tmp_path, monkeypatch):
  monkeypatch.setattr(real, "SOURCES", _sources(tmp_path))
  audio_dir = str(tmp_path / "audio")
  corpus = real.write_corpus(audio_dir, num_clips=3, progress=False)
  # talk: 15.75 s -> 10 s + 5.75 s; tune: 25.25 s -> 10 + 10 + 5.25 s: five clips, three kept
  ids = ["talk-00000", "talk-00001", "tune-00000", "tune-00001", "tune-00002"]
  kept = sorted(sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:3])
  assert sorted(f[:-4] for f in os.listdir(audio_dir) if f.endswith(".wav")) == kept
  rows = [r for _, path in corpus.segments_csvs for r in csv.reader(open(path))
          if not r[0].startswith("#")]
  assert sorted(r[0] for r in rows) == kept
  for ytid, _, _, labels in rows:
    assert labels == ("/real/speech" if ytid.startswith("talk") else "/real/music")
  with open(corpus.labels_csv) as f:
    assert [r[1] for r in csv.reader(f)][1:] == ["/real/speech", "/real/music",
                                                  "/real/sound effect"]


def test_missing_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
  sources = _sources(tmp_path) + (real.Source("x", "music", "pkg-absent", str(tmp_path / "no")),)
  monkeypatch.setattr(real, "SOURCES", sources)
  with pytest.raises(UserError, match=r"needs the Debian packages pkg-absent: install them with "
                                      r"`apt-get install -y .*pkg-absent"):
    real.build(str(tmp_path / "data"), num_clips=8)
  assert not os.path.exists(tmp_path / "data")
