#!/usr/bin/env bash
# Pretrain on one host (CPU, one or more GPUs, or a single TPU VM).
#
#   launch/local.sh [--dry-run] CONFIG WORKDIR [--config.field=value ...]
#   launch/local.sh configs/demo.py workdirs/demo
#   launch/local.sh configs/tiny.py /data/runs/tiny --config.data.data_dir=/data/audioset_tfds
#
# Every device of the host joins one ('data', 'fsdp') mesh. Running it again with the same
# WORKDIR resumes from the latest checkpoint. Exit status 143 means the run was stopped by
# SIGTERM after writing a checkpoint: start it again to continue.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3

CMD=("$PYTHON" "$REPO/main.py" "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
cd "$REPO"
exec "${CMD[@]}"
