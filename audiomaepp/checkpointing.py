"""Workdir layout and Orbax checkpoints.

A workdir (from pretraining, or from `tools.import_original`) holds:
  config.json            the resolved experiment config (the experiment record)
  checkpoints/<step>/    Orbax CheckpointManager steps; item `params` holds the model parameters
                         (other items, such as optimiser state and the data iterator, may sit beside)
"""
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

import audiomaepp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PARAMS_ITEM = "params"


def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config (plus the package version) as JSON; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  record = json.loads(config.to_json_best_effort())
  record["_audiomaepp_version"] = audiomaepp.__version__
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads the config recorded in a workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a workdir written by main.py or "
        "audiomaepp.tools.import_original")
  with open(path) as f:
    record = json.load(f)
  record.pop("_audiomaepp_version", None)
  return ml_collections.ConfigDict(record)


def checkpoint_manager(workdir: str, **options: Any) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager over `workdir/checkpoints` (options: CheckpointManagerOptions)."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(**options))


def save_params(workdir: str, params: Any, step: int = 0) -> None:
  """Saves model parameters alone as checkpoint `step` (used for imported checkpoints)."""
  with checkpoint_manager(workdir, enable_async_checkpointing=False) as manager:
    manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
    manager.wait_until_finished()


def restore_params(workdir: str, abstract_params: Any, step: Optional[int] = None) -> Any:
  """Restores the `params` item of checkpoint `step` (default: latest) shaped like the target.

  `abstract_params` is a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`
  of the model's init); arrays without a sharding are placed on the default device.
  """
  with checkpoint_manager(workdir, read_only=True) as manager:
    if step is None:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, CHECKPOINT_DIR)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or device),
        abstract_params)
    restored = manager.restore(
        step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
  return restored[PARAMS_ITEM]
