"""Pretrain AudioMAE++: `python main.py --config=configs/demo.py --workdir=DIR [--config.x=y]`.

Configs whose `task` is 'finetune' (configs/finetune_*.py) fine-tune instead
(`audiomaepp.train.finetune.run`).

Parses flags, joins the other hosts when there are several (jax.distributed), and hands over to
`audiomaepp.train.run`. Starting again on the same workdir resumes from its latest checkpoint.
Exit status: 0 done; 1 error (one `error:` line on stderr); 75 another host was lost (last line
`error: host N lost at step S; last checkpoint: step C`; start every host again to resume) or
this host could not join the others; 143 stopped by SIGTERM after a checkpoint; 134 (SIGABRT)
the coordinator (process 0) was lost: JAX's client aborts the process within seconds, and
`launch/supervise.sh` prints the one-line report. The supervisor restarts on 75, 143 and deaths
by a signal.

Compiled programs are kept in JAX's persistent compilation cache: `JAX_COMPILATION_CACHE_DIR`,
or this user's ~/.cache/audiomaepp/jax_compilation_cache (`parallel.use_compilation_cache`).
"""
import multiprocessing
import os
import time

import jax
from absl import flags
from absl import logging
from ml_collections import config_flags

from audiomaepp import checkpointing
from audiomaepp import hosts
from audiomaepp import jax_internals
from audiomaepp import parallel
from audiomaepp import train
from audiomaepp.errors import UserError
from audiomaepp.tools import cli
from audiomaepp.train import finetune

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as if the signal had ended the process
HOST_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, starting again resumes
# Process 0 hosts the coordination service, whose end aborts the other processes (exit 134): it
# leaves last, this long after noticing a loss, so that the others leave with the status above.
COORDINATOR_GRACE_SECONDS = 3.0

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), e.g. configs/demo.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-host runs; unset: detected (SLURM, TPU VM) or single host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Always call jax.distributed.initialize() (TPU VM pods); otherwise only when the flags above "
    "or the environment (SLURM, JAX_COORDINATOR_ADDRESS) describe several processes.")
_HOST_TIMEOUT = flags.DEFINE_float(
    "host_timeout_seconds", 8.0,
    "Multi-host runs: a host silent this long is lost; the others exit with status 75.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    joined = parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                             _PROCESS_ID.value, force=_DISTRIBUTED.value)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Mostly transient (the coordinator not up yet, a host still restarting): worth a restart.
    cli.print_error(f"could not join the other hosts: {str(e).splitlines()[0] if str(e) else e!r}")
    raise SystemExit(HOST_LOST_EXIT_CODE) from None
  logging.info("compilation cache: %s", parallel.use_compilation_cache())
  watchdog = _watch_hosts(_WORKDIR.value) if joined and jax.process_count() > 1 else None
  try:
    run = finetune.run if _CONFIG.value.get("task") == "finetune" else train.run
    result = run(_CONFIG.value, _WORKDIR.value,
                 on_step=None if watchdog is None else watchdog.note_step)
  except UserError:
    if watchdog is not None:
      watchdog.finish()  # every host stops with this error: none is lost
    raise
  except Exception:
    if watchdog is not None:
      # A collective may fail because a host died (Gloo: "Connection reset by peer"): give the
      # watchdog time to name the host; when it does, it ends the process.
      watchdog.wait(2 * _HOST_TIMEOUT.value)
    raise
  if watchdog is not None:
    watchdog.finish()
  if result.preempted:
    raise SystemExit(PREEMPTED_EXIT_CODE)


def _watch_hosts(workdir: str) -> hosts.HostWatchdog:
  """Starts the watchdog that ends this process with HOST_LOST_EXIT_CODE when a host is lost."""

  def on_lost(host: int) -> None:
    if jax.process_index() == 0:
      time.sleep(COORDINATOR_GRACE_SECONDS)
    for child in multiprocessing.active_children():  # Grain workers
      child.kill()
    try:
      checkpoint = checkpointing.latest_complete_step(workdir)
    except Exception:  # pylint: disable=broad-except
      checkpoint = "unknown (storage unreadable)"
    cli.print_error(f"host {host} lost at step {watchdog.step}; last checkpoint: step {checkpoint}")
    # The main thread may be blocked in a collective with the lost host and JAX's exit handler
    # would wait for it at a shutdown barrier: end now. Checkpoints are atomic; a save in flight
    # stays temporary and is removed by the next start.
    os._exit(HOST_LOST_EXIT_CODE)  # pylint: disable=protected-access

  watchdog = hosts.HostWatchdog(jax_internals.coordination_client(), jax.process_index(),
                                jax.process_count(), on_lost, timeout=_HOST_TIMEOUT.value)
  watchdog.note_step(checkpointing.latest_complete_step(workdir) or 0)
  return watchdog.start()



if __name__ == "__main__":
  cli.run(main)
