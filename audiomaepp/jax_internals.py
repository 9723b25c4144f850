"""The only module that touches JAX's private modules (`jax._src`): the coordination-service
client (the host watchdog's heartbeats) and JAX's cluster detection (SLURM, TPU VM pods).

Neither has a public API in the JAX versions below. Each accessor checks that the private name is
still there and otherwise fails with one clear error naming the JAX versions this module knows,
so that an upgrade of JAX breaks in one place, with a message, not deep inside a run.
"""
from typing import Any, Optional

import jax

from audiomaepp.errors import UserError

# JAX releases whose private names below were checked.
KNOWN_JAX_VERSIONS = ("0.10.2",)


class UnsupportedJaxError(UserError):
  """The installed JAX lacks a private name the project relies on: every CLI reports it as one
  `error:` line."""


def _missing(what: str, error: BaseException) -> UnsupportedJaxError:
  return UnsupportedJaxError(
      f"JAX {jax.__version__} has no {what} ({type(error).__name__}: {error}); audiomaepp knows "
      f"JAX {', '.join(KNOWN_JAX_VERSIONS)}: install one of those (requirements.txt pins it)")


def coordination_client() -> Any:
  """The coordination-service client of this process (after `jax.distributed.initialize`):
  `key_value_set`, `key_value_dir_get`."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel
    client = distributed.global_state.client
  except (ImportError, AttributeError) as e:
    raise _missing("jax._src.distributed.global_state.client", e) from None
  if client is None:
    raise RuntimeError("jax.distributed.initialize() has not been called in this process")
  return client


def detect_cluster(coordinator_address: Optional[str], num_processes: Optional[int],
                   process_id: Optional[int], local_device_ids: Optional[list[int]],
                   timeout_seconds: int = 300) -> tuple[Any, Any, Any, Any]:
  """(coordinator_address, num_processes, process_id, local_device_ids) with the unset ones
  filled in by JAX's cluster detection (SLURM, TPU VM pods, ...)."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  except (ImportError, AttributeError) as e:
    raise _missing("jax._src.clusters.ClusterEnv.auto_detect_unset_distributed_params", e
                   ) from None
  return detect(coordinator_address, num_processes, process_id, local_device_ids, None,
                timeout_seconds)
