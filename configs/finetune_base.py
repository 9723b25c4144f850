"""Fine-tunes an AudioMAE++ Base encoder on a labelled HEAR task folder (AudioMAE's recipe).

    python main.py --config=configs/finetune_base.py --workdir=runs/ft \
        --config.init_from=runs/base --config.data.task_dir=/data/hear/esc50-v2.0.0-full

The recipe's fields and their sources are in `audiomaepp.experiment.finetune_config`. For
imbalanced multi-label sets (AudioSet-2M style) add `--config.finetune.weighted_sampling=True`.
"""
from audiomaepp import experiment


def get_config():
  config = experiment.finetune_config(size="base")
  config.data.eval_crops = 5  # clips of up to 10 s scored whole (2-s crops), as AudioMAE does
  return config
