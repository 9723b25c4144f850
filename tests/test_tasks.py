"""HEAR task folders, the embedding folder contract and HEAR's split rotation."""
import csv
import json
import shutil

import numpy as np
import pytest
import soundfile

from audiomaepp import errors
from audiomaepp.evaluation import tasks

KWS_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def test_read_hear_task_on_a_generated_suite(hear_suite_dir):
  task_dir = hear_suite_dir / "kws-v1"
  task = tasks.read_hear_task(task_dir)
  assert task.name == "kws-v1"
  assert task.metadata["prediction_type"] == "multiclass"
  assert task.vocabulary == KWS_WORDS
  assert {s: len(split.files) for s, split in task.splits.items()} == {
      "train": 30, "valid": 20, "test": 20}
  for name, split in task.splits.items():
    mapping = json.loads((task_dir / f"{name}.json").read_text())
    assert split.files == sorted(mapping)
    assert split.labels == [mapping[f] for f in split.files]
    assert split.paths[0] == task_dir / "16000" / name / split.files[0]
    info = soundfile.info(split.paths[-1])
    assert (info.samplerate, info.channels) == (16000, 1)


def _split_arrays(task, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal((len(s.files), dim)).astype(np.float32), s.labels, s.files)
          for name, s in task.splits.items()}


def test_embeddings_round_trip(hear_suite_dir, tmp_path):
  task = tasks.read_hear_task(hear_suite_dir / "pitch-v1")
  arrays = _split_arrays(task)
  out = tasks.write_task_embeddings(tmp_path, "pitch-v1", task.metadata, task.vocabulary, arrays)
  assert out == tmp_path / "pitch-v1"
  assert tasks.has_task_embeddings(tmp_path, "pitch-v1")
  assert tasks.list_task_dirs(tmp_path) == [out]
  # The files of the documented layout, readable without this package.
  assert json.loads((out / "task_metadata.json").read_text()) == task.metadata
  with open(out / "labelvocabulary.csv", newline="") as f:
    rows = [(int(r["idx"]), r["label"]) for r in csv.DictReader(f)]
  assert rows == list(enumerate(task.vocabulary))
  np.testing.assert_array_equal(np.load(out / "test.embeddings.npy"), arrays["test"][0])
  assert json.loads((out / "valid.labels.json").read_text()) == task.splits["valid"].labels
  assert json.loads((out / "train.filenames.json").read_text()) == task.splits["train"].files

  back = tasks.read_task_embeddings(out)
  assert back.name == "pitch-v1" and back.vocabulary == task.vocabulary
  for name, (embeddings, labels, files) in arrays.items():
    np.testing.assert_array_equal(back.splits[name].embeddings, embeddings)
    assert back.splits[name].labels == labels and back.splits[name].filenames == files
  targets = back.targets(["valid", "test"])
  expected = [task.vocabulary.index(row[0]) for row in labels_of(task, "valid", "test")]
  np.testing.assert_array_equal(targets.argmax(1), expected)
  assert targets.sum() == len(expected)


def labels_of(task, *splits):
  return [row for s in splits for row in task.splits[s].labels]


def test_a_folder_without_metadata_counts_as_incomplete(hear_suite_dir, tmp_path):
  task = tasks.read_hear_task(hear_suite_dir / "kws-v1")
  out = tasks.write_task_embeddings(tmp_path, "kws-v1", task.metadata, task.vocabulary,
                                    _split_arrays(task))
  (out / "task_metadata.json").unlink()
  assert not tasks.has_task_embeddings(tmp_path, "kws-v1")
  assert tasks.list_task_dirs(tmp_path) == []


def test_multilabel_targets_are_multi_hot(tmp_path):
  metadata = {"splits": ["train", "valid", "test"], "prediction_type": "multilabel",
              "embedding_type": "scene", "evaluation": ["mAP"]}
  labels = {"train": [["a", "c"], []], "valid": [["b"]], "test": [["a", "b", "c"]]}
  arrays = {s: (np.zeros((len(l), 4), np.float32), l, [f"{s}{i}.wav" for i in range(len(l))])
            for s, l in labels.items()}
  tasks.write_task_embeddings(tmp_path, "tags", metadata, ["a", "b", "c"], arrays)
  back = tasks.read_task_embeddings(tmp_path / "tags")
  assert back.multilabel
  np.testing.assert_array_equal(back.targets(["train", "test"]),
                                [[1, 0, 1], [0, 0, 0], [1, 1, 1]])
  assert tasks.primary_metric(back.metadata) == "mAP"


def test_fold_rotation_follows_hear():
  metadata = {"splits": ["fold02", "fold00", "fold04", "fold01", "fold03"],
              "split_mode": "new_split_kfold"}
  runs = tasks.data_splits(metadata)
  assert runs[0] == {"train": ["fold02", "fold03", "fold04"], "valid": ["fold01"],
                     "test": ["fold00"]}
  assert runs[3] == {"train": ["fold00", "fold01", "fold02"], "valid": ["fold04"],
                     "test": ["fold03"]}
  assert runs[4] == {"train": ["fold01", "fold02", "fold03"], "valid": ["fold00"],
                     "test": ["fold04"]}
  folds = sorted(metadata["splits"])
  for i, run in enumerate(runs):
    assert run["test"] == [folds[i]] and run["valid"] == [folds[(i + 1) % 5]]
    assert sorted(run["train"] + run["valid"] + run["test"]) == folds
  # Without split_mode, fold names alone mark a fold-based task.
  assert tasks.data_splits({"splits": ["fold0", "fold1", "fold2"]})[2] == {
      "train": ["fold1"], "valid": ["fold0"], "test": ["fold2"]}


def test_train_valid_test_split_mode():
  metadata = {"splits": ["test", "train", "valid"], "split_mode": "trainvaltest"}
  assert tasks.data_splits(metadata) == [{"train": ["train"], "valid": ["valid"], "test": ["test"]}]
  with pytest.raises(ValueError, match="missing \\['valid'\\]"):
    tasks.data_splits({"splits": ["train", "test"], "split_mode": "trainvaltest"})
  with pytest.raises(ValueError, match="at least 3 distinct folds"):
    tasks.data_splits({"splits": ["fold00", "fold01"], "split_mode": "presplit_kfold"})


def test_primary_metric_is_the_first_evaluation_entry():
  assert tasks.primary_metric({"evaluation": ["pitch_acc", "chroma_acc"],
                               "prediction_type": "multiclass"}) == "pitch_acc"
  assert tasks.primary_metric({"prediction_type": "multiclass"}) == "top1_acc"


@pytest.fixture
def task_copy(hear_suite_dir, tmp_path):
  return shutil.copytree(hear_suite_dir / "kws-v1", tmp_path / "kws-v1")


def _edit_json(path, edit):
  value = json.loads(path.read_text())
  edit(value)
  path.write_text(json.dumps(value))


def test_bad_task_folders_give_clear_errors(task_copy):
  _edit_json(task_copy / "valid.json", lambda m: m.update({"extra.wav": ["maybe"]}))
  with pytest.raises(ValueError, match=r"valid\.json: row \d+ has labels \['maybe'\]"):
    tasks.read_hear_task(task_copy)
  _edit_json(task_copy / "valid.json", lambda m: m.update({"extra.wav": ["yes", "no"]}))
  with pytest.raises(ValueError, match="multiclass task needs exactly one"):
    tasks.read_hear_task(task_copy)
  _edit_json(task_copy / "task_metadata.json", lambda m: m.update({"embedding_type": "event"}))
  with pytest.raises(ValueError, match="task_metadata.json: embedding_type 'event'"):
    tasks.read_hear_task(task_copy)
  _edit_json(task_copy / "task_metadata.json", lambda m: m.pop("prediction_type"))
  with pytest.raises(ValueError, match="field 'prediction_type' must be one of"):
    tasks.read_hear_task(task_copy)
  (task_copy / "labelvocabulary.csv").write_text("idx,label\n0,yes\n2,no\n")
  with pytest.raises(ValueError, match="labelvocabulary.csv: idx must be 0..1"):
    tasks.read_vocabulary(task_copy)


def test_write_rejects_inconsistent_embeddings(tmp_path):
  metadata = {"splits": ["train", "valid", "test"], "prediction_type": "multiclass",
              "embedding_type": "scene"}
  good = (np.zeros((2, 3), np.float32), [["a"], ["b"]], ["x.wav", "y.wav"])
  with pytest.raises(ValueError, match="no embeddings for splits \\['test'\\]"):
    tasks.write_task_embeddings(tmp_path, "t", metadata, ["a", "b"], {"train": good, "valid": good})
  short = (np.zeros((2, 3), np.float32), [["a"]], ["x.wav", "y.wav"])
  with pytest.raises(ValueError, match="t/valid: expected embeddings \\(n, D\\) with n labels"):
    tasks.write_task_embeddings(tmp_path, "t", metadata, ["a", "b"],
                                {"train": good, "valid": short, "test": good})
  nan = (np.full((2, 3), np.nan, np.float32), [["a"], ["b"]], ["x.wav", "y.wav"])
  with pytest.raises(ValueError, match="t/test: embeddings contain NaN"):
    tasks.write_task_embeddings(tmp_path, "t", metadata, ["a", "b"],
                                {"train": good, "valid": good, "test": nan})
  assert not tasks.has_task_embeddings(tmp_path, "t")


@pytest.mark.parametrize("split,row,value", [("train", 3, np.nan), ("test", 5, -np.inf)])
def test_non_finite_embeddings_are_refused_naming_file_split_and_row(tmp_path, split, row, value):
  """A NaN in the training embeddings gives a chance-level probe with exit 0 unless refused."""
  vocabulary = ["a", "b"]
  metadata = {"splits": ["train", "valid", "test"], "embedding_type": "scene",
              "prediction_type": "multiclass"}
  rng = np.random.default_rng(0)
  tasks.write_task_embeddings(tmp_path, "t-v1", metadata, vocabulary, {
      s: (rng.normal(size=(6, 4)).astype(np.float32), [["a"], ["b"]] * 3,
          [f"{s}_{i}.wav" for i in range(6)]) for s in metadata["splits"]})
  path = tmp_path / "t-v1" / f"{split}.embeddings.npy"
  embeddings = np.load(path)
  embeddings[row, 1] = value
  np.save(path, embeddings)
  with pytest.raises(errors.UserError) as error:
    tasks.read_task_embeddings(tmp_path / "t-v1")
  assert str(error.value).startswith(
      f"{path}: split {split!r} row {row} ({split}_{row}.wav) holds NaN or infinite values")
