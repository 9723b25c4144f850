"""Pretraining: optimiser (`optim`), pure steps (`step`) and the loop (`loop.run`)."""
from audiomaepp.train.loop import (CheckpointError, ConfigError, NonFiniteLossError, RunResult,
                                   TrainingError, run, validate_config)

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "RunResult", "TrainingError",
           "run", "validate_config"]
