"""Fine-tuning on a task of folds (ESC-50 style): hear-eval-kit's runs, joined splits."""
import numpy as np
import pytest

from audiomaepp import metrics
from audiomaepp.data import labelled
from audiomaepp.train import finetune
import finetune_tasks

FOLDS = ("fold00", "fold01", "fold02")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return finetune_tasks.write_tone_task(tmp_path_factory.mktemp("folds"), "folds-v1",
                                        per_class=2, splits=FOLDS)


def _config(task_dir, fold):
  config = finetune_tasks.tiny_finetune_config(task_dir)
  config.data.fold = fold
  return config


def test_each_fold_is_a_run_as_hear_eval_kit_forms_it(task_dir):
  task = labelled.open_labelled(_config(task_dir, 0).data)
  assert [finetune.run_splits(_config(task_dir, i), task) for i in range(3)] == [
      {"train": "fold02", "eval": "fold01", "test": "fold00"},
      {"train": "fold00", "eval": "fold02", "test": "fold01"},
      {"train": "fold01", "eval": "fold00", "test": "fold02"}]
  with pytest.raises(finetune.ConfigError, match=r"config.data.train_split='train': 'train' is "
                     r"not a split of .*folds-v1 \(it has \['fold00', 'fold01', 'fold02'\]\)"):
    finetune.run_splits(_config(task_dir, -1), task)  # no fold chosen: the fields are used


def test_joined_splits_keep_their_order(task_dir):
  task = labelled.open_labelled(_config(task_dir, 0).data)
  parts = [task.load(f) for f in ("fold02", "fold00")]
  joined = task.load("fold02, fold00")
  assert joined.files == parts[0].files + parts[1].files
  np.testing.assert_array_equal(joined.targets, np.concatenate([p.targets for p in parts]))
  for i, spectrogram in enumerate([*parts[0].spectrograms, *parts[1].spectrograms]):
    np.testing.assert_array_equal(joined.spectrograms[i], spectrogram)
  with pytest.raises(IndexError):
    joined.spectrograms[len(joined)]  # pylint: disable=expression-not-assigned


def test_a_fold_out_of_range_is_one_line(task_dir, tmp_path):
  with pytest.raises(finetune.ConfigError,
                     match=r"config.data.fold=3: .*folds-v1 has 3 folds \(0 to 2\)"):
    finetune.run(_config(task_dir, 3), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_fold_of_a_task_without_folds_is_one_line(tmp_path):
  task_dir = finetune_tasks.write_tone_task(tmp_path, per_class=1)
  with pytest.raises(finetune.ConfigError, match=r"config.data.fold=0: .* is not a task of folds"):
    finetune.run(_config(task_dir, 0), str(tmp_path / "w"))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_fold_run_trains_validates_and_tests_on_its_folds(task_dir, tmp_path):
  workdir = tmp_path / "fold1"
  finetune.run(_config(task_dir, 1), str(workdir))
  records = metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
  assert len([r for r in records if r["split"] == "eval"]) == 2
  assert len([r for r in records if r["split"] == "test"]) == 1
  scored = finetune.score_workdir(str(workdir))
  assert scored["split"] == "fold01"
  test = [r for r in records if r["split"] == "test"][0]
  assert scored["top1_acc"] == pytest.approx(test["top1_acc"])


@pytest.mark.parametrize("source, task_dir, message", [
    ("hear", None, r"^config.data.task_dir is not set: give a HEAR task folder"),
    ("folder", "x", r"^config.data.source='folder': fine-tuning reads a HEAR task folder \('hear'\) "
                    r"or labelled TFDS shards \('tfds'\)$"),
])
def test_missing_or_unknown_data_is_one_line_and_writes_nothing(tmp_path, source, task_dir,
                                                                message):
  config = finetune_tasks.tiny_finetune_config(task_dir)
  config.data.source, config.data.task_dir = source, task_dir
  with pytest.raises(finetune.ConfigError, match=message):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
