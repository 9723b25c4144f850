"""Training: the runner (`runner.run`) and its tasks, pretraining (`pretrain`) and fine-tuning
(`finetune`); optimisers (`optim`), the train state (`state`) and the pure steps (`step`,
`finetune_step`)."""
from audiomaepp.train.pretrain import run, validate_config
from audiomaepp.train.runner import (CheckpointError, ConfigError, NonFiniteLossError, RunResult,
                                     TrainingError)

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "RunResult", "TrainingError",
           "run", "validate_config"]
