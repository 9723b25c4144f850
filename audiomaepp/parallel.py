"""Device mesh, logical-axis shardings and multi-host helpers.

One `jax.sharding.Mesh` with axes ('data', 'fsdp') spans every device of every host. Arrays carry
logical axis names that the config's `logical_axis_rules` map to mesh axes, so data parallel and
FSDP differ only in config: 'batch' (input batches, and the activations at every block boundary,
constrained in the model), 'embed', 'mlp', 'heads' (parameters) and 'layers' (the stacked axis
of scanned blocks).
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from audiomaepp import jax_internals
from audiomaepp.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXIS = "batch"


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from the config, where -1 takes the devices left over."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise UserError("config.mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known <= 0 or num_devices % known:
      raise UserError(f"config.mesh: {known} does not divide the {num_devices} devices")
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise UserError(f"config.mesh: data {data} x fsdp {fsdp} != {num_devices} devices")
  return data, fsdp


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    # Topology-aware placement only knows some device kinds; a plain reshape is always valid.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules in effect: the config's when `shard_params` is set; otherwise
  parameter axes map to no mesh axis (parameters replicated) and only the batch is split."""
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in config.logical_axis_rules)
  if config.shard_params:
    return rules
  return tuple((name, axes if name == BATCH_AXIS else None) for name, axes in rules)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of dimensions they do not divide (such arrays stay replicated there)."""
  dims = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    dims.append(axes if size > 1 and dim % size == 0 else None)
  return PartitionSpec(*dims)


def param_shardings(abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for (possibly `nn.Partitioned`-boxed) variables, as an unboxed tree.

  Logical names map to mesh axes by `rules`; a dimension a mesh axis does not divide evenly is
  replicated instead (e.g. a 64-wide output layer on an 8-way FSDP axis).
  """
  specs = nn.get_partition_spec(abstract_variables)
  mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
  shapes = nn.meta.unbox(abstract_variables)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _divisible_spec(spec, x.shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


# The rules when none are given: the batch split over every mesh axis.
DEFAULT_RULES = ((BATCH_AXIS, MESH_AXES),)


def batch_sharding(mesh: Mesh, rules: Optional[Sequence[tuple[str, Any]]] = None
                   ) -> NamedSharding:
  """The sharding of a global batch: the leading axis as the `batch` rule maps it."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes((BATCH_AXIS,), rules or DEFAULT_RULES))


def with_axis_rules(fn: Callable, mesh: Mesh,
                    rules: Optional[Sequence[tuple[str, Any]]] = None) -> Callable:
  """`fn` traced under `mesh` and the logical-axis `rules`, so that the model's activation
  constraints (`nn.with_logical_constraint`) take effect (they are no-ops without rules)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
        nn.logical_axis_rules(rules or DEFAULT_RULES):
      return fn(*args, **kwargs)

  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def cluster_detected() -> bool:
  """Whether the environment describes several processes (SLURM, multi-host TPU VM, explicit)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """What `jax.distributed.initialize` gets; `local_device_ids` None: every local device."""
  coordinator_address: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]
  local_device_ids: Optional[list[int]]


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r}: expected an integer") from None


def resolve_distributed(coordinator_address: Optional[str] = None,
                        num_processes: Optional[int] = None, process_id: Optional[int] = None,
                        force: bool = False) -> Optional[DistributedSettings]:
  """The multi-process settings of this process, or None for a single process.

  Explicit arguments win, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID /
  JAX_LOCAL_DEVICE_IDS, then what JAX detects (SLURM: one process per task, each on the GPU of
  its SLURM_LOCALID; TPU VM pods). `force` asks for a cluster even when none is visible in the
  environment (TPU VM pods, whose workers JAX finds through the metadata server).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
  local_device_ids = [int(i) for i in ids.split(",")] if ids else None
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not (force or explicit or cluster_detected()):
    return None
  if None in (coordinator_address, num_processes, process_id):
    (coordinator_address, num_processes, process_id,
     detected_ids) = jax_internals.detect_cluster(coordinator_address, num_processes,
                                                  process_id, local_device_ids)
    local_device_ids = local_device_ids or detected_ids
  if None in (coordinator_address, num_processes, process_id):
    missing = [name for name, value in (("JAX_COORDINATOR_ADDRESS", coordinator_address),
                                        ("JAX_NUM_PROCESSES", num_processes),
                                        ("JAX_PROCESS_ID", process_id)) if value is None]
    raise UserError(f"a multi-process run needs {', '.join(missing)} (or the flags "
                    "--coordinator_address, --num_processes, --process_id)")
  return DistributedSettings(coordinator_address, num_processes, process_id, local_device_ids)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when running as several processes; returns whether it did.

  Settings come from `resolve_distributed` (arguments, JAX_* environment, detected cluster). A
  single process without cluster variables is left alone (no coordinator needed).
  """
  settings = resolve_distributed(coordinator_address, num_processes, process_id, force)
  if settings is None:
    return False
  jax.distributed.initialize(**dataclasses.asdict(settings))
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def default_compilation_cache_dir() -> str:
  """This user's local cache directory for compiled programs:
  `$XDG_CACHE_HOME/audiomaepp/jax_compilation_cache` (~/.cache/... by default). Local, so that
  it is never a bucket shared by every run, and bounded by the machine's disk."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "audiomaepp", "jax_compilation_cache")


def use_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache and returns its directory: the one
  `JAX_COMPILATION_CACHE_DIR` (or `jax_compilation_cache_dir`) names, else
  `default_compilation_cache_dir()`, so that restarts and runs side by side on this machine reuse
  each other's compiled programs. `JAX_ENABLE_COMPILATION_CACHE=false` turns it off."""
  directory = jax.config.jax_compilation_cache_dir
  if not directory:
    directory = default_compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", directory)
  return directory
