"""Fine-tunes the demo encoder (configs/demo.py) on a small built-in HEAR task: minutes on a CPU.

    python main.py --config=configs/demo.py --workdir=workdirs/demo
    python main.py --config=configs/finetune_demo.py --workdir=workdirs/ft \
        --config.init_from=workdirs/demo --config.data.task_dir=TASKS/pitch-v1

Task folders come from ../shared/evalsuite/make_suite.py (kws, pitch). The model fields equal
configs/demo.py's, so its checkpoints load; the recipe is the small-task one of
configs/finetune_small.py (its docstring cites each field).
"""
import os

from audiomaepp import experiment


def get_config():
  return experiment.load_config(os.path.join(os.path.dirname(__file__), "finetune_small.py"),
                                "demo")
