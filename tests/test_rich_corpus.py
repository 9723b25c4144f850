"""The rich built-in corpus: speech and music text, the MIDI writer, the build, missing engines."""
import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from audiomaepp import errors
from audiomaepp.data import builders
from audiomaepp.data import music
from audiomaepp.data import rich
from audiomaepp.data import speech
import conftest

ENGINES = speech.available() and music.available()
needs_engines = pytest.mark.skipif(
    not ENGINES, reason="espeak-ng, fluidsynth or fluid-soundfont-gm is not installed "
                        "(apt-get install -y espeak-ng fluidsynth fluid-soundfont-gm)")
NUM_CLIPS = 12  # one generation chunk; every 10th clip is 'eval'


@pytest.fixture(scope="module")
def make_suite():
  spec = importlib.util.spec_from_file_location("make_suite", conftest.require_make_suite())
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_speech_never_says_the_kws_keywords(make_suite):
  assert speech.EXCLUDED_WORDS == set(make_suite.KWS_WORDS)
  spoken = set()
  for i in range(1000):
    utterance = speech.random_utterance(np.random.default_rng([7, i]))
    spoken.update(utterance["text"].split())
  assert not spoken & speech.EXCLUDED_WORDS
  assert len(spoken) > 150  # words, digits and made-up words, not a handful of phrases


def test_music_pieces_are_melodies_chords_or_drums_not_isolated_notes():
  for i in range(50):
    events = music.random_piece(np.random.default_rng(i), 3.0)
    note_ons = [t for t, msg in events if msg[0] & 0xF0 == 0x90]
    assert len(note_ons) >= 3, i  # the pitch task plays one note per clip
    assert min(note_ons) >= 0 and max(note_ons) < 3.0


def test_midi_file_layout_and_variable_length_quantities():
  # Variable-length quantities as in the Standard MIDI File 1.0 specification's examples.
  examples = {0x00: b"\x00", 0x40: b"\x40", 0x7F: b"\x7f", 0x80: b"\x81\x00",
              0x2000: b"\xc0\x00", 0x3FFF: b"\xff\x7f", 0x100000: b"\xc0\x80\x00"}
  for value, encoded in examples.items():
    assert music._vlq(value) == encoded  # pylint: disable=protected-access
  on, off = bytes([0x90, 60, 100]), bytes([0x80, 60, 0])
  data = music.midi_file([(0.5, on), (1.0, off), (1.0, bytes([0x90, 62, 90]))])
  assert data[:14] == b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0"  # format 0, 1 track, 480
  assert data[14:18] == b"MTrk"
  track = data[22:]
  assert int.from_bytes(data[18:22], "big") == len(track)
  # 0.5 s = 480 ticks at 120 bpm; the note-off sorts before the note-on at the same tick.
  assert track == (b"\x83\x60" + on + b"\x83\x60" + off + b"\x00" + bytes([0x90, 62, 90])
                   + b"\x00\xff\x2f\x00")


def test_missing_engines_are_a_user_error_naming_the_packages(monkeypatch):
  monkeypatch.setattr(speech, "available", lambda: False)
  with pytest.raises(errors.UserError, match="espeak-ng.*apt-get install"):
    rich.check_engines()


@needs_engines
def test_rich_corpus_is_deterministic_labelled_and_built_once(tmp_path):
  clips = rich.make_chunk(0, NUM_CLIPS, seed=0)
  again = rich.make_chunk(0, NUM_CLIPS, seed=0)
  for (wave, names), (wave2, names2) in zip(clips, again):
    np.testing.assert_array_equal(wave, wave2)
    assert names == names2 and names
  kinds = {name for _, names in clips for name in names}
  assert {"speech", "music"} <= kinds
  for wave, names in clips:
    assert 2.0 <= wave.size / rich.SAMPLE_RATE <= 6.0
    assert np.abs(wave).max() <= 1.0 and np.std(wave) > 1e-3
  # A different seed gives different audio.
  assert not np.array_equal(clips[0][0][:16000], rich.make_chunk(0, 1, seed=1)[0][0][:16000])

  root = rich.build(str(tmp_path), NUM_CLIPS, num_workers=0, progress=False)
  assert root == rich.dataset_dir(str(tmp_path), NUM_CLIPS)
  builder = tfds.builder_from_directory(builders.dataset_dir(root))
  assert builder.info.splits["train"].num_examples == NUM_CLIPS - 2
  assert builder.info.splits["eval"].num_examples == 2
  source = builder.as_data_source(split="train")
  records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
  record = records["rich000001"]
  assert [rich.CLASSES[k] for k in record["labels"]] == list(clips[1][1])
  assert record["duration"] == pytest.approx(clips[1][0].size / rich.SAMPLE_RATE, abs=1e-4)
  assert rich.build(str(tmp_path), NUM_CLIPS, num_workers=0, progress=False) == root
