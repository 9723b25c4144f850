"""One process of a two-process restore (tests/test_multihost_restore.py): joins the other,
restores the workdir's checkpoints, prints the outcome as JSON.

  python tests/restore_process.py WORKDIR PORT PROCESS_ID FAULT RESTORE

FAULT (injected on process 1 only): 'none'; 'damaged_6' (its reads of step 6 fail as a
truncated file does, as when only its shards are damaged); 'transient' (its first read fails
as storage that does not answer); 'bug' (its read of step 6 fails as a bug does).
RESTORE: 'with_fallback' (`restore_with_fallback`, as training restores) or 'params'
(`restore_params`, as fine-tuning's `init_from` reads).
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from audiomaepp import checkpointing


def params(step):
  """The parameters saved as `step` (tests/test_multihost_restore.py saves them)."""
  return {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) * step, "bias": jnp.ones(4) * step}}


def _inject(fault):
  original, calls = ocp.CheckpointManager.restore, []

  def restore(self, step, *args, **kwargs):
    calls.append(step)
    if fault == "damaged_6" and step == 6:
      raise ValueError("OUT_OF_RANGE: Error reading byte range of a truncated file")
    if fault == "transient" and len(calls) == 1:
      raise ValueError("UNAVAILABLE: storage did not answer")
    if fault == "bug" and step == 6:
      raise KeyError("a bug on process 1")
    return original(self, step, *args, **kwargs)

  ocp.CheckpointManager.restore = restore
  checkpointing.READ_BACKOFF_SECONDS = 0.05
  return calls


def main(workdir, port, process_id, fault, restore):
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=60)
  calls = _inject(fault) if process_id == 1 and fault != "none" else []
  if restore == "params":  # no sharding: each process places them on its own device
    restored = checkpointing.restore_params(workdir, jax.eval_shape(lambda: params(0)))
    outcome = {"kernel_step": float(np.asarray(restored["dense"]["kernel"])[0, 1])}
  else:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
    with checkpointing.training_manager(workdir, keep=5) as manager:
      restored = checkpointing.restore_with_fallback(manager, abstract(params(0)),
                                                     abstract({"step": jnp.int32(0)}))
    kernel = np.asarray(restored.params["dense"]["kernel"].addressable_data(0))
    outcome = {"step": restored.step, "skipped": [s for s, _ in restored.skipped],
               "kernel_step": float(kernel[0, 1])}
  print(json.dumps({**outcome, "reads": calls}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
