"""Fine-tuning on labelled TFDS shards (AudioSet's layout built by prepare_dataset)."""
import numpy as np
import pytest

from audiomaepp import audio
from audiomaepp import metrics
from audiomaepp.data import labelled
from audiomaepp.errors import UserError
from audiomaepp.train import finetune
import finetune_tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("audioset")
  return root, finetune_tasks.write_audioset_shards(root)


def _config(data_dir):
  config = finetune_tasks.tiny_finetune_config(None)
  config.data.source, config.data.data_dir, config.data.task_dir = "tfds", data_dir, None
  config.data.eval_split, config.data.test_split = "eval", ""
  return config


def test_shards_give_names_multi_hot_targets_and_standardised_clips(data_dir):
  root, path = data_dir
  dataset = labelled.open_labelled(_config(path).data)
  assert dataset.vocabulary == ["tone 0", "tone 1", "tone 2"] and dataset.multilabel
  assert dataset.splits == ["eval", "train"]
  split = dataset.load("train")
  assert len(split) == 12 and split.targets.shape == (12, 3)
  rows = open(root / "balanced_train_segments.csv").read().splitlines()[1:]
  expected = {row.split(",")[0]: sorted(int(m[3:]) for m in row.split('"')[1].split(","))
              for row in rows}
  for name, target in zip(split.files, split.targets):
    assert np.flatnonzero(target).tolist() == expected[name]
  clip = split.spectrograms[split.files.index(rows[0].split(",")[0])]
  reference = audio.standardize(audio.log_mel(audio.load_audio(
      str(root / "audio" / "balanced" / f"Y{rows[0].split(',')[0]}.wav"))))
  np.testing.assert_allclose(clip, reference, atol=0.02)  # stored as float16
  assert abs(clip.mean()) < 0.01 and abs(clip.std() - 1) < 0.01


def test_a_missing_split_is_one_line_and_writes_nothing(data_dir, tmp_path):
  _, path = data_dir
  with pytest.raises(UserError, match=r"split 'valid' is not a split of .* \(it has \['eval', "
                     r"'train'\]\)"):
    labelled.open_labelled(_config(path).data).load("valid")
  config = _config(path)
  config.data.eval_split = "valid"
  with pytest.raises(finetune.ConfigError, match=r"config.data.eval_split='valid': 'valid' is not a split"):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_finetunes_on_shards_with_map(data_dir, tmp_path):
  _, path = data_dir
  workdir = tmp_path / "ft"
  result = finetune.run(_config(path), str(workdir))
  assert result.step == 4
  records = metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 2 and all(0 <= r["mAP"] <= 1 and "ap/2" in r for r in evals)
  scored = finetune.score_workdir(str(workdir), split="eval")
  assert scored["task"] == "audio_logmel" and 0 <= scored["mAP"] <= 1
