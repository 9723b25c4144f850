"""Fine-tunes an AudioMAE++ Base encoder on AudioSet shards with labels (multi-label, mAP).

    python -m audiomaepp.tools.prepare_dataset --audio_dir=/data/audioset/audio \
        --segments_csv=balanced_train_segments.csv,eval_segments.csv \
        --labels_csv=class_labels_indices.csv --output_dir=/data/as20k_tfds
    python main.py --config=configs/finetune_audioset.py --workdir=runs/ft_as20k \
        --config.init_from=runs/base --config.data.data_dir=/data/as20k_tfds

The balanced set (AudioSet-20K) trains on 'train' and is scored on 'eval' (the best checkpoint by
its mAP is kept in WORKDIR/best); the recipe is `audiomaepp.experiment.finetune_config`'s
(AudioMAE's AS-20K script). For AudioSet-2M (unbalanced_train_segments.csv too) add
`--config.finetune.weighted_sampling=True` (AudioMAE's `--weight_sampler`).
"""
from audiomaepp import experiment


def get_config():
  config = experiment.finetune_config(size="base")
  config.data.source = "tfds"
  config.data.eval_split = "eval"
  config.data.test_split = ""  # AudioSet has no third split: 'eval' is the reported one
  config.data.eval_crops = 5  # the whole 10-s clip in 2-s crops, as AudioMAE scores all 10 s
  return config
