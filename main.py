"""Pretrain AudioMAE++: `python main.py --config=configs/demo.py --workdir=DIR [--config.x=y]`.

Parses flags, joins the other hosts when there are several (jax.distributed), and hands over to
`audiomaepp.train.run`. Starting again on the same workdir resumes from its latest checkpoint.
Exit status: 0 done, 1 error (one line on stderr), 143 stopped by SIGTERM after a checkpoint.
"""
from absl import flags
from ml_collections import config_flags

from audiomaepp import parallel
from audiomaepp import train
from audiomaepp.errors import UserError
from audiomaepp.tools import cli

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as if the signal had ended the process

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  force=_DISTRIBUTED.value)
  result = train.run(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    raise SystemExit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main)
