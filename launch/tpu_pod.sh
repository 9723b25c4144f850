#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM pod slice: create the slice, install this checkout on every worker,
# run main.py on all hosts at once, detached and supervised, watch it, stop it, delete the slice.
#
#   launch/tpu_pod.sh [--dry-run] create
#   launch/tpu_pod.sh [--dry-run] setup
#   launch/tpu_pod.sh [--dry-run] run CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_pod.sh [--dry-run] status          # per worker: running or not, last log line
#   launch/tpu_pod.sh [--dry-run] logs [WORKER]   # last LINES lines of each worker's log
#   launch/tpu_pod.sh [--dry-run] stop            # SIGTERM: checkpoint, then exit
#   launch/tpu_pod.sh [--dry-run] watch CONFIG WORKDIR [overrides]   # recreate after preemption
#   launch/tpu_pod.sh [--dry-run] delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION, PROJECT (gcloud's
# default when empty), SPOT=1 for preemptible capacity, LINES (logs), MAX_RESTARTS and BACKOFF
# (launch/supervise.sh on each worker), WATCH_EVERY and MAX_RECREATES (watch).
# WORKDIR should be a gs:// URL: Orbax and etils write it natively, every host sees it, no mount.
# data_dir is read as a local path: copy the dataset to each worker (gcloud storage cp -r).
# Example:
#   TPU_NAME=maepp ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 launch/tpu_pod.sh run \
#     configs/base.py gs://my-bucket/runs/base --config.data.data_dir=/data/audioset_tfds
#
# setup ships the last commit of this checkout (it refuses while tracked files have uncommitted
# changes) and installs Python 3.11 with uv (the TPU base images ship 3.10; jax 0.10.2 needs >= 3.11).
# run starts `launch/supervise.sh -- main.py` with setsid/nohup on every worker, so training
# survives the ssh session; each worker logs to ~/audiomaepp/logs/<hostname>.log. The supervisor
# restarts after host loss or a crash; `watch` (run it where you run gcloud) recreates a
# preempted spot slice, sets it up and runs again, resuming from the checkpoint in WORKDIR.
set -euo pipefail

TPU_NAME=${TPU_NAME:-audiomaepp}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
LINES=${LINES:-50}
MAX_RESTARTS=${MAX_RESTARTS:-5}
BACKOFF=${BACKOFF:-20}
WATCH_EVERY=${WATCH_EVERY:-300}
MAX_RECREATES=${MAX_RECREATES:-10}
PYTHON_VERSION=3.11
GCSFS_VERSION=2026.10.1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
ACTION=${1:-}
[[ $# -gt 0 ]] && shift

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")

on_workers() {  # on_workers WORKERS COMMAND
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

usage() {
  echo "usage: $0 [--dry-run] {create|setup|run CONFIG WORKDIR [overrides]|status|logs [WORKER]|stop|watch CONFIG WORKDIR [overrides]|delete}" >&2
  exit 2
}

need_config() {
  if [[ $# -lt 2 ]]; then usage; fi
}

create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local archive=/tmp/audiomaepp-src.tar.gz
  # The workers get the last commit: refuse rather than silently drop edits not committed yet,
  # or files of the package, configs and launchers never added (a new config file).
  if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
    echo "error: $REPO has uncommitted changes and setup ships the last commit (git archive HEAD): commit or stash them first" >&2
    exit 1
  fi
  local untracked
  untracked=$(git -C "$REPO" ls-files --others --exclude-standard -- audiomaepp configs launch | head -n 1)
  if [[ -n "$untracked" ]]; then
    echo "error: $REPO/$untracked is not committed and setup ships the last commit (git archive HEAD): git add and commit it, or remove it" >&2
    exit 1
  fi
  run git -C "$REPO" archive --format=tar.gz -o "$archive" HEAD
  run "${GCLOUD[@]}" scp "$archive" "$TPU_NAME:audiomaepp-src.tar.gz" "${LOCATION[@]}" --worker=all
  on_workers all "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; mkdir -p audiomaepp && tar xzf audiomaepp-src.tar.gz -C audiomaepp && cd audiomaepp; \
uv venv --python $PYTHON_VERSION .venv; \
uv pip install --python .venv/bin/python -q -r requirements.txt 'jax[tpu]==0.10.2' gcsfs==$GCSFS_VERSION; \
uv pip install --python .venv/bin/python -q --no-deps -e .; \
.venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'"
}

start() {  # start CONFIG WORKDIR [overrides]: every worker, detached, one log per worker
  local args
  args=$(printf '%q ' launch/supervise.sh --max_restarts "$MAX_RESTARTS" --backoff "$BACKOFF" \
         -- .venv/bin/python main.py --distributed "--config=$1" "--workdir=$2" "${@:3}")
  # The supervisor records its own pid: `$!` would name setsid's parent where setsid forks.
  on_workers all "cd audiomaepp && mkdir -p logs && \
{ setsid nohup bash -c 'echo \$\$ > logs/supervise.pid; exec $args' >> logs/\$(hostname).log 2>&1 < /dev/null & }"
}

case "$ACTION" in
  create) create ;;
  setup) setup ;;
  run) need_config "$@"; start "$@" ;;
  status)
    on_workers all "cd audiomaepp && if kill -0 \$(cat logs/supervise.pid 2>/dev/null) 2>/dev/null; \
then state=running; else state=stopped; fi; echo \"\$(hostname): \$state | \$(tail -n 1 logs/\$(hostname).log 2>/dev/null)\""
    ;;
  logs) on_workers "${1:-all}" "tail -n $LINES audiomaepp/logs/\$(hostname).log" ;;
  stop) on_workers all "kill -TERM \$(cat audiomaepp/logs/supervise.pid) 2>/dev/null || true" ;;
  watch)
    need_config "$@"
    for ((recreated = 0; ; )); do
      state=$(run "${GCLOUD[@]}" describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state)' || echo MISSING)
      if [[ $DRY_RUN == 1 ]]; then state=PREEMPTED; fi
      case "$state" in
        READY)
          if ! on_workers 0 "kill -0 \$(cat audiomaepp/logs/supervise.pid)"; then
            echo "training on $TPU_NAME has ended (done, or given up): see logs" >&2; exit 0
          fi ;;
        CREATING|STARTING|RESTARTING|REPAIRING) ;;
        *) if [[ $recreated -ge $MAX_RECREATES ]]; then
             echo "slice $TPU_NAME is $state after $recreated recreations: giving up" >&2; exit 1
           fi
           recreated=$((recreated + 1))
           echo "slice $TPU_NAME is $state: recreating it ($recreated of $MAX_RECREATES)" >&2
           [[ "$state" == MISSING ]] || run "${GCLOUD[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet
           create; setup; start "$@" ;;
      esac
      [[ $DRY_RUN == 1 ]] && exit 0
      sleep "$WATCH_EVERY"
    done
    ;;
  delete) run "${GCLOUD[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet ;;
  *) usage ;;
esac
