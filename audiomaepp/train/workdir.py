"""A run's workdir before training starts: what may run there, and the experiment record.

Every check raises `ConfigError` (one line naming the field or the path) before anything is
written; `record_config` writes config.json only once the run is accepted.
"""
import dataclasses
import json

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util

from audiomaepp import checkpointing
from audiomaepp import models
from audiomaepp.errors import UserError


class TrainingError(UserError):
  """A run that cannot start or continue; the message is one line for the user (every CLI
  prints it as `error: <message>`)."""


class ConfigError(TrainingError):
  """The config is invalid (found before anything is compiled)."""


# Model fields that change how the model is computed, not what: they may differ on resume.
IMPLEMENTATION_FIELDS = ("remat", "attention_impl")
# Fields outside the model that shape the optimiser state (`optim.create_optimizer`).
OPTIMISER_STRUCTURE_FIELDS = ("grad_clip_norm", "grad_accum_steps")


def check_workdir(workdir: str) -> None:
  """--workdir must be a directory (new, or of an earlier run)."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir={workdir} is a file; expected a directory (a new one, or the "
                      "workdir of an earlier run to resume)")


def check_writable(workdir: str) -> None:
  """Creates the workdir if needed and checks that files can be written into it."""
  path = epath.Path(workdir)
  probe = path / f".write_test.{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e}): checkpoints "
                      "and metrics cannot be saved there; use a writable directory") from None


def has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a config.json and at least one checkpoint step."""
  checkpoint_dir = epath.Path(workdir) / checkpointing.CHECKPOINT_DIR
  record = epath.Path(workdir) / checkpointing.CONFIG_FILE
  return bool(record.exists() and checkpoint_dir.is_dir()
              and any(p.name.isdigit() for p in checkpoint_dir.iterdir()))


def check_same_model(workdir: str, model_config: models.ModelConfig) -> None:
  """A workdir's checkpoints resume only with the model recorded in its config.json: another
  architecture fails to restore, or (same parameter shapes, e.g. other num_heads) silently
  computes something else. Fields in `IMPLEMENTATION_FIELDS` may change."""
  if not has_checkpoints(workdir):
    return
  record = epath.Path(workdir) / checkpointing.CONFIG_FILE
  try:
    recorded = models.resolve_model_config(checkpointing.load_config(workdir).model)
  except UserError as e:
    raise ConfigError(f"{record}: the recorded model is not valid ({e}); use a new workdir"
                      ) from None
  if recorded.scan_layers != model_config.scan_layers:
    raise ConfigError(
        f"the checkpoints in {workdir} hold "
        f"{'stacked' if recorded.scan_layers else 'per-block'} layers: resume with "
        f"--config.model.scan_layers={recorded.scan_layers}, or use a new workdir")
  changed = [f.name for f in dataclasses.fields(recorded)
             if f.name not in ("size", *IMPLEMENTATION_FIELDS)
             and getattr(recorded, f.name) != getattr(model_config, f.name)]
  if changed:
    differences = ", ".join(f"{name}={getattr(model_config, name)!r} (recorded "
                            f"{getattr(recorded, name)!r})" for name in changed)
    raise ConfigError(f"config.model differs from the model the checkpoints in {workdir} were "
                      f"trained with: {differences}; resume with the recorded model, or use a "
                      "new workdir")


def structure_error(workdir: str, config: ml_collections.ConfigDict,
                    error: Exception) -> ConfigError:
  """The one-line error for checkpoints whose train state has another structure than `config`
  builds: names the optimiser fields that differ from those recorded in config.json."""
  recorded = (checkpointing.load_config(workdir)
              if (checkpointing.workdir_path(workdir) / checkpointing.CONFIG_FILE).exists()
              else ml_collections.ConfigDict())
  changed = [f"config.{name}={config[name]!r} (recorded {recorded[name]!r})"
             for name in OPTIMISER_STRUCTURE_FIELDS
             if name in recorded and recorded[name] != config[name]]
  if changed:
    return ConfigError(f"the optimiser state in the checkpoints of {workdir} has another "
                       f"structure than this config's: {', '.join(changed)}; resume with the "
                       "recorded values, or use a new workdir")
  return ConfigError(f"{error}; resume with the config the checkpoints were written with, or use "
                     "a new workdir")


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, warning about fields that differ from the config of an earlier run."""
  if (checkpointing.workdir_path(workdir) / checkpointing.CONFIG_FILE).exists():
    flat = lambda c: traverse_util.flatten_dict(json.loads(c.to_json_best_effort()), sep=".")
    before, now = flat(checkpointing.load_config(workdir)), flat(config)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
      logging.warning("config differs from the one recorded in %s in %s; recording the new one",
                      workdir, changed)
  checkpointing.save_config(workdir, config)
