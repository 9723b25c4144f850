"""Labelled data for fine-tuning: the label index, sparse labels, the weighted sampler and the
Grain training batches (host-, worker- and resume-invariant), against independent references."""
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

from absl import flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from audiomaepp import experiment
from audiomaepp.data import builders
from audiomaepp.data import labelled
from audiomaepp.data import pipeline
from audiomaepp.data import sources
import conftest
import finetune_tasks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """(root with the CSVs, TFDS data_dir) of 12 'train' and 12 'eval' tones of 3 classes."""
  root = tmp_path_factory.mktemp("audioset")
  return root, finetune_tasks.write_audioset_shards(root)


def _csv_labels(root, name):
  """{YTID: sorted class indices} of a segments CSV, parsed here (mids are /m/0000c)."""
  rows = (root / name).read_text().splitlines()[1:]
  return {row.split(",")[0]: sorted(int(m[3:]) for m in row.split('"')[1].split(","))
          for row in rows}


def _data_config(data_dir, num_workers=0):
  config = experiment.finetune_config().data
  config.source, config.data_dir, config.num_workers = "tfds", data_dir, num_workers
  return config


def _multi_hot(lists, classes):
  targets = np.zeros((len(lists), classes), np.float32)
  for row, labels in enumerate(lists):
    for c in labels:
      targets[row, c] = 1.0
  return targets


def _batches(split, config, count, **kwargs):
  iterator = labelled.train_iterator(split, config, **kwargs)
  try:
    return list(itertools.islice(iterator, count))
  finally:
    iterator.close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"spectrogram", "targets"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_label_index_lists_the_csv_labels_in_record_order(shards):
  root, data_dir = shards
  path = pipeline.dataset_path(_data_config(data_dir))
  builder = tfds.builder_from_directory(path)
  for split, csv in (("train", "balanced_train_segments.csv"), ("eval", "eval_segments.csv")):
    index = builders.read_label_index(path, split)
    records = builder.as_data_source(split=split)
    assert [i.decode() for i in index.ids] == [records[i]["id"].decode()
                                               for i in range(len(records))]
    expected = _csv_labels(root, csv)
    assert len(index.ids) == len(expected) == 12
    for row, clip in enumerate(index.ids):
      assert index.classes[index.offsets[row]:index.offsets[row + 1]].tolist() == expected[
          clip.decode()]
    from_records = builders.label_index_from_records(builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES))
    for field in ("ids", "offsets", "classes"):
      np.testing.assert_array_equal(getattr(from_records, field), getattr(index, field))


class _Unreadable(Sequence):
  """A record source of the right length whose records cannot be read."""

  def __init__(self, source):
    self._length = len(source)

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    raise AssertionError("a record was read")

  def __getitems__(self, indices):
    raise AssertionError("records were read")


def test_loading_a_split_reads_no_record(shards, monkeypatch):
  root, data_dir = shards
  record_source = pipeline.record_source
  monkeypatch.setattr(pipeline, "record_source",
                      lambda *args: _Unreadable(record_source(*args)))
  monkeypatch.setattr(pipeline, "decode_record", lambda _: pytest.fail("a record was decoded"))
  split = labelled.open_labelled(_data_config(data_dir)).load("train")
  expected = _csv_labels(root, "balanced_train_segments.csv")
  assert sorted(split.files) == sorted(expected)
  np.testing.assert_array_equal(split.targets,
                                _multi_hot([expected[f] for f in split.files], 3))


def test_shards_without_an_index_read_the_labels_of_their_records(shards, tmp_path, caplog):
  _, data_dir = shards
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  path = pipeline.dataset_path(_data_config(str(copy)))
  for split in ("train", "eval"):
    os.remove(builders.label_index_path(path, split))
  with caplog.at_level("WARNING", logger="absl"):
    split = labelled.open_labelled(_data_config(str(copy))).load("train")
  assert "no label index of split 'train'" in caplog.text and "prepare_dataset" in caplog.text
  indexed = labelled.open_labelled(_data_config(data_dir)).load("train")
  np.testing.assert_array_equal(split.targets, indexed.targets)
  assert list(split.files) == list(indexed.files)
  assert builders.write_missing_label_indexes(path) == ["eval", "train"]
  written = builders.read_label_index(path, "train")
  reference = builders.read_label_index(pipeline.dataset_path(_data_config(data_dir)), "train")
  for field in ("ids", "offsets", "classes"):
    np.testing.assert_array_equal(getattr(written, field), getattr(reference, field))


def test_parts_merge_into_the_index_of_a_one_machine_build(shards, tmp_path):
  root, data_dir = shards
  inputs = sources.Sources(
      str(root / "audio"), labels_csv=str(root / "class_labels_indices.csv"),
      segments_csvs=tuple(sources.parse_segments_arg(str(root / name))
                          for name in ("balanced_train_segments.csv", "eval_segments.csv")))
  for part in range(2):
    builders.build(inputs, str(tmp_path), part=(part, 2), progress=False)
  builder, _ = builders.merge_parts(str(tmp_path), 2)
  reference = pipeline.dataset_path(_data_config(data_dir))
  for split in ("train", "eval"):
    merged = builders.read_label_index(str(builder.data_path), split)
    expected = builders.read_label_index(reference, split)
    for field in ("ids", "offsets", "classes"):
      np.testing.assert_array_equal(getattr(merged, field), getattr(expected, field))


def test_joined_splits_keep_their_order(shards):
  _, data_dir = shards
  config = _data_config(data_dir)
  task = labelled.open_labelled(config)
  parts = [task.load(name) for name in ("eval", "train")]
  joined = task.load("eval,train")
  assert len(joined) == 24 and list(joined.files) == list(parts[0].files) + list(parts[1].files)
  np.testing.assert_array_equal(joined.targets, np.concatenate([p.targets for p in parts]))
  np.testing.assert_array_equal(joined.spectrograms[13], parts[1].spectrograms[1])
  crop, classes = joined.spectrograms.example(13, 100)
  np.testing.assert_array_equal(crop, parts[1].spectrograms[1][50:150])
  np.testing.assert_array_equal(classes, parts[1].labels[1])


def test_sparse_labels_give_multi_hot_targets_of_any_rows():
  lists = [[2], [0, 4], [], [1, 2, 3], [4]]
  labels = labelled.Labels.from_lists(lists, 5)
  np.testing.assert_array_equal(labels.dense(), _multi_hot(lists, 5))
  np.testing.assert_array_equal(labels.dense([3, 0, 3, 2]),
                                _multi_hot([lists[i] for i in (3, 0, 3, 2)], 5))
  joined = labelled.Labels.concatenate([labels, labelled.Labels.from_lists([[1], [0, 1]], 5)])
  np.testing.assert_array_equal(joined.dense(), _multi_hot(lists + [[1], [0, 1]], 5))
  np.testing.assert_array_equal(labels.counts(), [1, 1, 2, 1, 2])
  with pytest.raises(ValueError, match=r"class indices must be in \[0, 4\)"):
    labelled.Labels.from_lists(lists, 4)


def test_weights_favour_rare_labels():
  lists = [[0], [0], [0], [1], [0, 1]]
  weights = labelled.example_weights(labelled.Labels.from_lists(lists, 2))
  np.testing.assert_allclose(weights, [1000 / 4.01] * 3 + [1000 / 2.01, 1000 / 4.01 + 1000 / 2.01])


def _memory_split(lists, classes=5, frames=150):
  """Clip i: a constant i log-mel of frames + i frames, so a crop says which clip it is."""
  spectrograms = [np.full((frames + i, 80), i, np.float32) for i in range(len(lists))]
  return labelled.LabelledSplit.decoded(spectrograms, labelled.Labels.from_lists(lists, classes),
                                        [f"clip{i}" for i in range(len(lists))])


def test_weighted_draws_follow_the_weights_and_weights_are_computed_once(monkeypatch):
  lists = [[0], [0], [0], [0, 1], [1], [2], [2, 3], [3], [], [4]]
  split = _memory_split(lists)
  calls = []
  weights_of = labelled.example_weights
  monkeypatch.setattr(labelled, "example_weights",
                      lambda labels: calls.append(1) or weights_of(labels))
  draws = 20000
  rows = labelled.train_rows(split, seed=1, weighted=True)
  counts = np.bincount([rows[i] for i in range(draws)], minlength=len(lists))
  weights = np.array([sum(1000 / (sum(c in l for l in lists) + 0.01) for c in row)
                      for row in lists])
  expected = draws * weights / weights.sum()
  assert counts[8] == 0  # a clip without labels is never drawn
  chi_square = (((counts - expected) ** 2)[expected > 0] / expected[expected > 0]).sum()
  assert chi_square < 30  # 8 degrees of freedom: p < 1e-3
  config = experiment.finetune_config().data
  batches = _batches(split, config, 20, batch_size=4, seed=1, weighted=True, num_classes=5)
  assert len(batches) == 20 and len(calls) == 1


def test_batch_targets_are_the_multi_hot_of_the_cropped_clips():
  lists = [[0], [1, 2], [3], [0, 4], [2], [1]]
  split = _memory_split(lists)
  config = experiment.finetune_config().data
  config.crop_frames = 100
  for weighted in (False, True):
    for batch in _batches(split, config, 4, batch_size=4, seed=0, weighted=weighted):
      assert batch["spectrogram"].shape == (4, 100, 80)
      clips = batch["spectrogram"][:, 0, 0].astype(int)
      assert (batch["spectrogram"] == clips[:, None, None]).all()
      np.testing.assert_array_equal(batch["targets"], _multi_hot([lists[c] for c in clips], 5))


def test_uniform_batches_visit_every_clip_once_per_epoch():
  split = _memory_split([[0]] * 12)
  rows = labelled.train_rows(split, seed=7)
  order = [rows[i] for i in range(24)]
  assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
  assert order[:12] != order[12:]


def test_stored_batch_targets_are_the_labels_of_the_cropped_clips(shards):
  root, data_dir = shards
  config = _data_config(data_dir)
  split = labelled.open_labelled(config).load("train")
  expected = _csv_labels(root, "balanced_train_segments.csv")
  starts = np.stack([split.spectrograms[i][:200] for i in range(len(split))])
  for weighted in (False, True):
    for batch in _batches(split, config, 3, batch_size=4, seed=0, weighted=weighted):
      for crop, targets in zip(batch["spectrogram"], batch["targets"]):
        # 201-frame clips give 200-frame crops at offset 0; equal label sets are equal tones.
        matches = np.flatnonzero((starts == crop).all(axis=(1, 2)))
        assert matches.size
        for clip in matches:
          np.testing.assert_array_equal(targets, _multi_hot([expected[split.files[clip]]], 3)[0])


@pytest.mark.parametrize("weighted", [False, True])
def test_batches_do_not_depend_on_the_host_count_and_resume_exactly(shards, weighted):
  _, data_dir = shards
  config = _data_config(data_dir)
  split = labelled.open_labelled(config).load("train")
  kwargs = dict(batch_size=4, seed=3, weighted=weighted)
  fresh = _batches(split, config, 6, **kwargs)  # 12 clips: epochs end after batches 2 and 5
  halves = [_batches(split, config, 6, block=(i, 2), **kwargs) for i in range(2)]
  _assert_same([{k: np.concatenate([h[b][k] for h in halves]) for k in fresh[b]}
                for b in range(6)], fresh)
  _assert_same(_batches(split, config, 2, first_batch=4, **kwargs), fresh[4:])
  # Made in this process, batch by batch: what the iterator yields.
  _assert_same([labelled.host_batches(split, 200, 4, 3, (0, 1), weighted, b)[0]
                for b in range(6)], fresh)


@pytest.mark.slow  # spawning Grain workers costs ~15 s here
def test_batches_do_not_depend_on_the_worker_count(shards):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  _, data_dir = shards
  split = labelled.open_labelled(_data_config(data_dir)).load("train")
  kwargs = dict(batch_size=4, seed=5, first_batch=2, weighted=True)
  _assert_same(_batches(split, _data_config(data_dir, num_workers=2), 3, **kwargs),
               _batches(split, _data_config(data_dir), 3, **kwargs))


def test_eval_batches_hold_every_clip_once_with_centre_crops(shards):
  root, data_dir = shards
  split = labelled.open_labelled(_data_config(data_dir)).load("eval")
  expected = _csv_labels(root, "eval_segments.csv")
  batches = list(labelled.eval_batches(split, 100, 5, (0, 1)))
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [1] * 12 + [0] * 3)
  targets = np.concatenate([b["targets"] for b in batches])[:12]
  np.testing.assert_array_equal(targets, _multi_hot([expected[f] for f in split.files], 3))
  spectrograms = np.concatenate([b["spectrogram"] for b in batches])
  assert spectrograms.shape[1:3] == (1, 100)
  for i in range(12):
    np.testing.assert_allclose(spectrograms[i, 0], split.spectrograms[i][50:150], atol=1e-6)
  halves = [list(labelled.eval_batches(split, 100, 6, (i, 2))) for i in range(2)]
  whole = list(labelled.eval_batches(split, 100, 6, (0, 1)))
  for b, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([h[b][key] for h in halves]))


def test_eval_batches_with_several_crops_hold_them_from_the_start_to_the_end(shards):
  _, data_dir = shards
  split = labelled.open_labelled(_data_config(data_dir)).load("eval")
  spectrograms = np.concatenate([b["spectrogram"]
                                 for b in labelled.eval_batches(split, 100, 5, (0, 1), 3)])
  assert spectrograms.shape[1:3] == (3, 100) and spectrograms.dtype == np.float32
  for i in range(12):
    clip = split.spectrograms[i]
    free = clip.shape[0] - 100
    assert free > 0
    for k, offset in enumerate((0, free // 2, free)):
      np.testing.assert_allclose(spectrograms[i, k], clip[offset:offset + 100], atol=1e-6)


@pytest.mark.integration  # runs the benchmark command
def test_scale_benchmark_runs_at_a_tiny_size(tmp_path):
  with conftest.benchmark_module("labelled_scale") as module:
    lists = module.synthetic_labels(3000, 40, 2.7, seed=0)
    module.write_dataset(str(tmp_path), lists, 40)
    result = module.measure(str(tmp_path), batch_size=64, draws=500)
    split = labelled.open_labelled(_data_config(str(tmp_path))).load("train")
    assert [int(f) for f in split.files[:5]] != list(range(5))  # in TFDS's record order
    for row in range(0, 3000, 97):
      np.testing.assert_array_equal(split.labels[row], lists[int(split.files[row])])
    classes = sum(len(row) for row in lists)
    arrays = 3001 * 8 + classes * 4 + 3000 * 11 + 3000 * 8  # offsets, classes, ids, sampler
    assert result["arrays_mb"] * 2**20 == arrays
    assert arrays <= result["labels_mb"] * 2**20 <= result["peak_mb"] * 2**20
    assert all(0 <= clip < 3000 for clip in result["first_batch"] + result["drawn"])
  done = subprocess.run([sys.executable, "benchmarks/labelled_scale.py", "--clips=2000",
                        "--classes=30", "--batch_size=32", "--draws=200"],
                       cwd=conftest.CONFIGS.parent, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  last = done.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"labels_mb=[\d.]+ startup_s=[\d.]+ sampler_indices_per_s=\d+", last)
