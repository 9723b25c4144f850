"""What the fine-tuning tests share: tiny HEAR task folders of pure tones (NumPy, written in a
second), a tiny pretrained workdir, and the fine-tuning config and command shrunk to seconds."""
import json
import pathlib
import sys

import numpy as np
import soundfile as sf

SPLITS = ("train", "valid", "test")


def write_tone_task(root: pathlib.Path, name: str = "tones-v1", multilabel: bool = False,
                    classes: int = 3, per_class: int = 4, seconds: float = 1.0,
                    splits: tuple[str, ...] = SPLITS) -> pathlib.Path:
  """A task whose class c is a tone at 300 * 2**c Hz (multi-label: each clip sums the tones of
  one or two classes), with `splits` (fold* names: a task of folds). Returns the task folder."""
  task_dir = root / name
  rng = np.random.default_rng(0)
  vocabulary = [f"tone{c}" for c in range(classes)]
  (task_dir / "16000").mkdir(parents=True)
  t = np.arange(int(16000 * seconds)) / 16000
  for split in splits:
    (task_dir / "16000" / split).mkdir()
    mapping = {}
    for i in range(classes * per_class):
      labels = [i % classes]
      if multilabel and rng.random() < 0.5:
        labels.append(int(rng.integers(classes)))
      labels = sorted(set(labels))
      wave = sum(np.sin(2 * np.pi * 300 * 2 ** c * t + rng.random() * 6) for c in labels)
      wave = 0.3 * wave / len(labels) + 0.01 * rng.standard_normal(t.size)
      file = f"{i:03d}.wav"
      sf.write(task_dir / "16000" / split / file, wave.astype(np.float32), 16000)
      mapping[file] = [vocabulary[c] for c in labels]
    (task_dir / f"{split}.json").write_text(json.dumps(mapping))
  (task_dir / "labelvocabulary.csv").write_text(
      "idx,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(vocabulary)))
  metadata = {"task_name": name, "version": "v1", "embedding_type": "scene",
              "prediction_type": "multilabel" if multilabel else "multiclass",
              "split_mode": "new_split_kfold" if splits[0].startswith("fold") else "trainvaltest",
              "splits": list(splits), "sample_duration": seconds,
              "evaluation": ["mAP" if multilabel else "top1_acc"]}
  (task_dir / "task_metadata.json").write_text(json.dumps(metadata))
  return task_dir


def tiny_finetune_config(task_dir, steps: int = 4, every: int = 2, init_from=None):
  """configs/finetune_demo.py shrunk to seconds: width 32, one block, batch 4."""
  from audiomaepp import experiment  # pylint: disable=import-outside-toplevel
  config = experiment.load_config(pathlib.Path(__file__).parents[1] / "configs" /
                                  "finetune_demo.py")
  m = config.model
  m.width, m.depth, m.num_heads = 32, 1, 2
  m.decoder_width, m.decoder_depth, m.decoder_num_heads = 32, 1, 2
  config.data.task_dir = str(task_dir)
  config.batch_size = 4
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = every
  config.checkpoint_every_steps = every
  config.init_from = init_from
  return config


def write_audioset_shards(root: pathlib.Path, classes: int = 3, per_class: int = 4) -> str:
  """Labelled TFDS shards as `tools.prepare_dataset` builds them from AudioSet's layout: tones of
  one or two classes (class c: 300 * 2**c Hz) in 'train' (balanced CSV) and 'eval'. Returns the
  data_dir."""
  from audiomaepp.data import builders  # pylint: disable=import-outside-toplevel
  from audiomaepp.data import sources  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  mids = [f"/m/{c:05d}" for c in range(classes)]
  (root / "class_labels_indices.csv").write_text(
      "index,mid,display_name\n" + "".join(f'{c},{mid},"tone {c}"\n' for c, mid in enumerate(mids)))
  t = np.arange(16000 * 2) / 16000
  csvs = []
  for split, name in (("balanced", "balanced_train_segments.csv"), ("eval", "eval_segments.csv")):
    (root / "audio" / split).mkdir(parents=True)
    rows = ["# YTID, start_seconds, end_seconds, positive_labels"]
    for i in range(classes * per_class):
      labels = sorted({i % classes, int(rng.integers(classes))})
      wave = sum(np.sin(2 * np.pi * 300 * 2 ** c * t) for c in labels) * 0.3 / len(labels)
      ytid = f"{split[:2]}{i:09d}"
      sf.write(root / "audio" / split / f"Y{ytid}.wav", wave.astype(np.float32), 16000)
      rows.append(f'{ytid}, 0.000, 2.000, "{",".join(mids[c] for c in labels)}"')
    (root / name).write_text("\n".join(rows) + "\n")
    csvs.append(sources.parse_segments_arg(str(root / name)))
  inputs = sources.Sources(str(root / "audio"), segments_csvs=tuple(csvs),
                           labels_csv=str(root / "class_labels_indices.csv"))
  builders.build(inputs, str(root / "tfds"), progress=False)
  return str(root / "tfds")


# main.py flags of the model `write_pretrained` saves and `tiny_finetune_config` uses.
MODEL_FLAGS = ("--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
               "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
               "--config.model.decoder_num_heads=2")


def write_pretrained(workdir: pathlib.Path) -> None:
  """A pretraining workdir of the tiny model (random parameters, the demo config's record)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from audiomaepp import checkpointing  # pylint: disable=import-outside-toplevel
  from audiomaepp import experiment  # pylint: disable=import-outside-toplevel
  from audiomaepp import models  # pylint: disable=import-outside-toplevel
  config = tiny_finetune_config("unused")
  module = models.build_model(config.model)
  params = models.unbox(module.init({"params": jax.random.PRNGKey(7),
                                     "masking": jax.random.PRNGKey(0)},
                                    jnp.zeros((1, 200, 80))))["params"]
  checkpointing.save_params(workdir, params)
  record = experiment.load_config(pathlib.Path(__file__).parents[1] / "configs" / "demo.py")
  record.model = config.model
  checkpointing.save_config(workdir, record)


def finetune_command(workdir, task_dir, pretrained, steps: int, every: int) -> list[str]:
  """`python main.py` fine-tuning the tiny model of `pretrained` on `task_dir` (batch 4, a log
  line every step, evaluation and checkpoint every `every` steps)."""
  return [sys.executable, "main.py", "--config=configs/finetune_demo.py", f"--workdir={workdir}",
          *MODEL_FLAGS, "--config.batch_size=4", f"--config.num_train_steps={steps}",
          "--config.log_every_steps=1", f"--config.eval_every_steps={every}",
          f"--config.checkpoint_every_steps={every}", f"--config.data.task_dir={task_dir}",
          f"--config.init_from={pretrained}"]
