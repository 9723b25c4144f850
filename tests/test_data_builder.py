"""The TFDS shard builder: bad files skipped with reasons, AudioSet labels, determinism."""
import json
import pathlib

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from audiomaepp import audio
from audiomaepp.data import builders
from audiomaepp.data import pipeline
from audiomaepp.data import sources
from audiomaepp import experiment
from audiomaepp.errors import UserError
from audiomaepp.tools import prepare_dataset


def _tone(seconds, rate=16000, freq=440.0, channels=1):
  t = np.arange(int(round(seconds * rate))) / rate
  wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.sin(2 * np.pi * 3 * freq * t)
  return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


def _records(dataset_dir, split):
  source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split=split)
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope="module")
def broken_build(tmp_path_factory):
  """A folder with one example of every kind of bad input, built without a held-out split."""
  root = tmp_path_factory.mktemp("broken")
  folder = root / "audio"
  folder.mkdir()
  sf.write(folder / "good.wav", _tone(3.0), 16000)
  sf.write(folder / "stereo.wav", _tone(2.0, rate=44100, channels=2), 44100)
  (folder / "empty.wav").write_bytes(b"")
  (folder / "random.wav").write_bytes(np.random.default_rng(0).bytes(3000))
  sf.write(folder / "full.flac", _tone(3.0), 16000)
  data = (folder / "full.flac").read_bytes()
  (folder / "full.flac").unlink()
  (folder / "truncated.flac").write_bytes(data[:len(data) // 2])
  sf.write(folder / "short.wav", _tone(0.05), 16000)
  nan = _tone(1.0)
  nan[100] = np.nan
  sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
  (folder / "notes.txt").write_text("not audio")
  builder, report = builders.build(sources.Sources(str(folder), eval_fraction=0.0),
                                   str(root / "out"), progress=False)
  return folder, pathlib.Path(builder.data_path), report


def test_broken_files_are_skipped_with_reasons(broken_build):
  _, dataset_dir, report = broken_build
  reasons = {s["file"]: s["reason"] for s in report["skipped_files"]}
  expected = {"empty.wav": "empty file", "random.wav": "undecodable",
              "truncated.flac": "corrupt or truncated", "short.wav": "too short: 0.050 s",
              "nan.wav": "non-finite samples"}
  assert set(reasons) == set(expected)
  for name, reason in expected.items():
    assert reason in reasons[name], (name, reasons[name])
  assert (report["seen"], report["written"], report["skipped"]) == (7, 2, 5)
  assert report["written_per_split"] == {"train": 2}
  assert report["conversions"] == {"downmixed 2 channels to mono": 1,
                                   "resampled 44100 Hz to 16000 Hz": 1}
  assert json.loads((dataset_dir / "report.json").read_text()) == report


def test_records_hold_full_clip_float16_log_mel(broken_build):
  folder, dataset_dir, _ = broken_build
  records = _records(dataset_dir, "train")
  assert sorted(records) == ["good.wav", "stereo.wav"]
  good = records["good.wav"]
  assert good["spectrogram"].dtype == np.float16
  np.testing.assert_array_equal(good["spectrogram"],
                                audio.log_mel(audio.load_audio(str(folder / "good.wav")))
                                .astype(np.float16))
  assert good["duration"] == pytest.approx(3.0)
  assert list(good["labels"]) == []
  stereo = records["stereo.wav"]
  assert stereo["spectrogram"].shape == (1 + 32000 // 160, 80)
  assert stereo["duration"] == pytest.approx(2.0)


def test_unlabelled_dataset_feeds_the_pipeline_without_labels(broken_build):
  _, dataset_dir, _ = broken_build
  config = experiment.data_config()
  config.data_dir = str(dataset_dir.parents[1])
  batch = next(pipeline.create_iterator(config, split="train", batch_size=2, seed=0, train=True))
  assert sorted(batch) == ["id", "spectrogram"]
  assert batch["spectrogram"].shape == (2, 200, 80)
  assert sorted(batch["id"]) == [b"good.wav", b"stereo.wav"]


LABELS_CSV = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/0bt9lr,"Dog"
3,/m/04rlf,"Music"
"""
TRAIN_CSV = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=6
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"
-0RWZT-miFs, 420.000, 430.000, "/m/04rlf,/m/0bt9lr,/m/09x0r"
-1nilez17Dg, 0.000, 10.000, "/m/04rlf"
-5xOcMJpTUk, 10.000, 20.000, "/m/zzzzz"
"""
EVAL_CSV = """# YTID, start_seconds, end_seconds, positive_labels
-0SdAVK79lg, 30.000, 40.000, "/m/0bt9lr"
"""


def _audioset_layout(root):
  audio_dir = root / "audio"
  (audio_dir / "balanced").mkdir(parents=True)
  (audio_dir / "eval").mkdir()
  sf.write(audio_dir / "balanced" / "Y--PJHxphWEs.wav", _tone(1.0, freq=300), 16000)
  sf.write(audio_dir / "balanced" / "-0RWZT-miFs_420000.flac", _tone(1.5, freq=500), 16000)
  sf.write(audio_dir / "balanced" / "-5xOcMJpTUk.wav", _tone(1.0), 16000)  # unknown label
  sf.write(audio_dir / "balanced" / "notinanycsv.wav", _tone(1.0), 16000)
  sf.write(audio_dir / "eval" / "-0SdAVK79lg.wav", _tone(2.5, freq=700), 16000)
  (root / "class_labels_indices.csv").write_text(LABELS_CSV)
  (root / "balanced_train_segments.csv").write_text(TRAIN_CSV)
  (root / "eval_segments.csv").write_text(EVAL_CSV)
  return sources.Sources(
      str(audio_dir),
      segments_csvs=tuple(sources.parse_segments_arg(str(root / name))
                          for name in ("balanced_train_segments.csv", "eval_segments.csv")),
      labels_csv=str(root / "class_labels_indices.csv"))


def test_audioset_layout_gives_label_indices_and_splits(tmp_path):
  inputs = _audioset_layout(tmp_path)
  builder, report = builders.build(inputs, str(tmp_path / "out"), progress=False)
  train, evaluation = (_records(builder.data_path, s) for s in ("train", "eval"))
  assert {k: list(v["labels"]) for k, v in train.items()} == {
      "--PJHxphWEs": [0, 1], "-0RWZT-miFs": [0, 2, 3]}
  assert {k: list(v["labels"]) for k, v in evaluation.items()} == {"-0SdAVK79lg": [2]}
  assert train["-0RWZT-miFs"]["duration"] == pytest.approx(1.5)
  labels = tfds.builder_from_directory(str(builder.data_path)).info.features["labels"].feature
  assert labels.names == ["Speech", "Male speech, man speaking", "Dog", "Music"]
  reasons = {s["file"]: s["reason"] for s in report["skipped_files"]}
  assert "no row" in reasons["balanced/notinanycsv.wav"]
  assert reasons["balanced/-5xOcMJpTUk.wav"] == (
      "unknown label id /m/zzzzz: not in class_labels_indices.csv")
  assert report["segments_without_file"] == 1  # -1nilez17Dg (the unknown-label row has a file)
  assert (report["seen"], report["written"], report["skipped"]) == (5, 3, 2)


def test_rebuilding_gives_identical_records_with_and_without_workers(tmp_path):
  inputs = _audioset_layout(tmp_path)
  first, _ = builders.build(inputs, str(tmp_path / "a"), progress=False)
  second, _ = builders.build(inputs, str(tmp_path / "b"), num_workers=2, progress=False)
  shards = sorted(p.name for p in pathlib.Path(first.data_path).glob("*.array_record*"))
  assert shards == sorted(p.name for p in pathlib.Path(second.data_path).glob("*.array_record*"))
  for name in shards:
    assert ((pathlib.Path(first.data_path) / name).read_bytes()
            == (pathlib.Path(second.data_path) / name).read_bytes()), name
  for split in ("train", "eval"):
    a = tfds.builder_from_directory(str(first.data_path)).as_data_source(split=split)
    b = tfds.builder_from_directory(str(second.data_path)).as_data_source(split=split)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["spectrogram"], y["spectrogram"])


def test_folder_split_is_deterministic_held_out_fraction(tmp_path):
  for i in range(20):
    sub = tmp_path / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    (sub / f"clip{i:02d}.wav").write_bytes(b"")  # listing does not decode
  listing = sources.list_clips(sources.Sources(str(tmp_path), eval_fraction=0.1))
  again = sources.list_clips(sources.Sources(str(tmp_path), eval_fraction=0.1))
  assert listing == again
  ids = {s: [c.id for c in clips] for s, clips in listing.clips.items()}
  assert len(ids["eval"]) == 2 and len(ids["train"]) == 18
  assert sorted(ids["eval"] + ids["train"]) == sorted(
      f"{'a' if i % 2 else 'b'}/clip{i:02d}.wav" for i in range(20))
  assert ids["train"] == sorted(ids["train"])


def test_parse_segments_arg():
  assert sources.parse_segments_arg("/d/eval_segments.csv") == ("eval", "/d/eval_segments.csv")
  assert sources.parse_segments_arg("/d/unbalanced_train_segments.csv") == (
      "train", "/d/unbalanced_train_segments.csv")
  assert sources.parse_segments_arg("valid=/d/x.csv") == ("valid", "/d/x.csv")
  with pytest.raises(ValueError, match="SPLIT=PATH"):
    sources.parse_segments_arg("=/d/x.csv")


def test_bad_sources_are_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    sources.Sources(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="labels CSV"):
    sources.Sources(str(tmp_path), segments_csvs=(("train", "x.csv"),))
  (tmp_path / "labels.csv").write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="index,mid,display_name"):
    sources.read_label_index(str(tmp_path / "labels.csv"))


def _folder_with_eval_files_broken(folder, num_files=6, eval_fraction=0.2):
  """Good tones for 'train'; the files the hash holds out for 'eval' are not audio."""
  folder.mkdir(parents=True)
  for i in range(num_files):
    (folder / f"clip{i}.wav").write_bytes(b"")
  held_out = sources.list_clips(sources.Sources(str(folder), eval_fraction=eval_fraction))
  for clip in held_out.clips["train"]:
    sf.write(clip.path, _tone(0.5, freq=200 + 50 * len(clip.id)), 16000)
  for clip in held_out.clips["eval"]:
    (folder / clip.file).write_bytes(b"RIFF not audio")
  return sources.Sources(str(folder), eval_fraction=eval_fraction), held_out


def test_split_of_only_unreadable_files_is_reported_and_the_rest_written(tmp_path):
  inputs, listing = _folder_with_eval_files_broken(tmp_path / "audio")
  (bad,) = [c.file for c in listing.clips["eval"]]
  builder, report = builders.build(inputs, str(tmp_path / "out"), progress=False)
  assert report["written_per_split"] == {"train": 5}
  assert (report["seen"], report["written"], report["skipped"]) == (6, 5, 1)
  assert report["skipped_per_split"] == {"eval": 1}
  assert list(report["empty_splits"]) == ["eval"]
  assert report["empty_splits"]["eval"].startswith(
      f"split 'eval': all 1 of its files were skipped, e.g. {bad}: undecodable audio")
  assert sorted(tfds.builder_from_directory(builder.data_path).info.splits) == ["train"]
  assert len(_records(builder.data_path, "train")) == 5
  assert (f"WARNING: split 'eval': all 1 of its files were skipped, e.g. {bad}: undecodable"
          in prepare_dataset.summary(report))


def test_nothing_to_write_is_one_line_naming_each_split(tmp_path):
  folder = tmp_path / "audio"
  folder.mkdir()
  for name in ("a.wav", "b.wav", "c.wav"):
    (folder / name).write_bytes(b"RIFF not audio")
  with pytest.raises(UserError) as raised:
    builders.build(sources.Sources(str(folder), eval_fraction=0.3), str(tmp_path / "out"),
                   progress=False)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(f"no audio file under {folder} could be")
  assert "split 'eval': all 1 of its files" in message
  assert "split 'train': all 2 of its files" in message


def test_labels_missing_from_the_class_csv_give_the_true_reason_and_counts(tmp_path):
  inputs = _audioset_layout(tmp_path)
  (tmp_path / "class_labels_indices.csv").write_text(  # no /m/0bt9lr (Dog), nor /m/zzzzz
      LABELS_CSV.replace('2,/m/0bt9lr,"Dog"\n3,', "2,"))
  _, report = builders.build(inputs, str(tmp_path / "out"), progress=False)
  reasons = {s["file"]: (s["split"], s["reason"]) for s in report["skipped_files"]}
  assert reasons == {
      "balanced/-0RWZT-miFs_420000.flac": (
          "train", "unknown label id /m/0bt9lr: not in class_labels_indices.csv"),
      "balanced/-5xOcMJpTUk.wav": (
          "train", "unknown label id /m/zzzzz: not in class_labels_indices.csv"),
      "balanced/notinanycsv.wav": (None, "no row for this file in the segments CSVs"),
      "eval/-0SdAVK79lg.wav": (
          "eval", "unknown label id /m/0bt9lr: not in class_labels_indices.csv"),
  }
  assert (report["seen"], report["written"], report["skipped"]) == (5, 1, 4)
  assert report["written_per_split"] == {"train": 1}
  assert report["skipped_per_split"] == {"eval": 1, "none": 1, "train": 2}
  assert report["segments_without_file"] == 1  # -1nilez17Dg only: the other rows have files
  assert report["empty_splits"] == {"eval": (
      "split 'eval': all 1 of its files were skipped, e.g. eval/-0SdAVK79lg.wav: unknown label "
      "id /m/0bt9lr: not in class_labels_indices.csv")}
  summary = prepare_dataset.summary(report)
  assert "1 CSV segments have no audio file" in summary
  assert summary.splitlines()[-1].startswith("WARNING: split 'eval': all 1 of its files")


def test_directory_links_are_followed_once_and_loops_reported(tmp_path):
  folder, outside = tmp_path / "audio", tmp_path / "elsewhere"
  (folder / "real").mkdir(parents=True)
  outside.mkdir()
  sf.write(folder / "real" / "a.wav", _tone(0.5), 16000)
  sf.write(outside / "b.wav", _tone(0.5, freq=300), 16000)
  (folder / "linked").symlink_to(outside, target_is_directory=True)
  (folder / "real" / "loop").symlink_to(folder, target_is_directory=True)
  (folder / "twin").symlink_to(folder / "real", target_is_directory=True)
  files, skipped_dirs = sources.list_audio_files(str(folder))
  assert files == ["linked/b.wav", "real/a.wav"]
  assert skipped_dirs == [("real/loop/", "directory link to ./, which is already read"),
                          ("twin/", "directory link to real/, which is already read")]
  builder, report = builders.build(sources.Sources(str(folder), eval_fraction=0.0),
                                   str(tmp_path / "out"), progress=False)
  assert sorted(_records(builder.data_path, "train")) == ["linked/b.wav", "real/a.wav"]
  assert report["skipped_directories"] == [
      {"directory": "real/loop/", "reason": "directory link to ./, which is already read"},
      {"directory": "twin/", "reason": "directory link to real/, which is already read"}]
  assert "skipped directory twin/: directory link to real/" in prepare_dataset.summary(report)


def test_parts_built_separately_and_merged_equal_a_one_machine_build(tmp_path):
  folder = tmp_path / "audio"
  folder.mkdir()
  for i in range(9):
    sf.write(folder / f"clip{i}.wav", _tone(0.3 + 0.05 * i, freq=150 + 40 * i), 16000)
  (folder / "broken.wav").write_bytes(b"RIFF not audio")
  inputs = sources.Sources(str(folder), eval_fraction=0.3)
  whole, whole_report = builders.build(inputs, str(tmp_path / "one"), progress=False)
  for part in range(3):  # three "machines", each writing only its own part
    builders.build(inputs, str(tmp_path / "many"), part=(part, 3), progress=False)
  merged, report = builders.merge_parts(str(tmp_path / "many"), 3)
  assert not (tmp_path / "many" / builders.PARTS_DIR).exists()
  assert merged.data_dir == builders.dataset_dir(str(tmp_path / "many"))
  for split in ("train", "eval"):
    a = tfds.builder_from_directory(whole.data_path).as_data_source(split=split)
    b = tfds.builder_from_directory(merged.data_dir).as_data_source(split=split)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # the same records in the same order
      assert x.keys() == y.keys() and x["id"] == y["id"]
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
  for key in ("seen", "written", "skipped", "written_per_split", "skipped_per_split",
              "empty_splits", "conversions", "segments_without_file"):
    assert report[key] == whole_report[key], key
  assert report["total_duration_s"] == pytest.approx(whole_report["total_duration_s"])
  assert report["skipped_files"] == whole_report["skipped_files"]


def test_merge_names_the_parts_not_built_yet(tmp_path):
  with pytest.raises(UserError, match=r"parts \[0, 1\] of 2 are not built yet"):
    builders.merge_parts(str(tmp_path), 2)
