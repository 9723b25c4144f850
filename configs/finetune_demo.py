"""Fine-tunes the demo encoder (configs/demo.py) on a small built-in HEAR task: minutes on a CPU.

    python main.py --config=configs/demo.py --workdir=workdirs/demo
    python main.py --config=configs/finetune_demo.py --workdir=workdirs/ft \
        --config.init_from=workdirs/demo --config.data.task_dir=TASKS/pitch-v1

Task folders come from ../shared/evalsuite/make_suite.py (kws, pitch). The model fields equal
configs/demo.py's, so its checkpoints load; the recipe is AudioMAE's, with the epochs of a demo.
"""
import os

from audiomaepp import experiment


def get_config():
  config = experiment.finetune_config(size=None)
  demo = experiment.load_config(os.path.join(os.path.dirname(__file__), "demo.py"))
  config.model = demo.model
  config.batch_size = 16
  config.num_train_steps = 150
  config.base_lr = 1.6e-2  # x 16 / 256: peak learning rate 1e-3
  config.warmup_epochs = 1
  config.log_every_steps = 10
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  return config
