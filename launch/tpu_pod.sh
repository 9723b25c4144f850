#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM pod slice: create the slice, copy this checkout to every worker and
# install it, run main.py on all hosts at once (jax.distributed configures itself on TPU VMs),
# delete the slice.
#
#   launch/tpu_pod.sh [--dry-run] create
#   launch/tpu_pod.sh [--dry-run] setup
#   launch/tpu_pod.sh [--dry-run] run CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_pod.sh [--dry-run] delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION, PROJECT (gcloud's
# default when empty), BUCKET (mounted with gcsfuse at /gcs
# on every worker so WORKDIR=/gcs/... is shared by all hosts), SPOT=1 for preemptible capacity.
# Example:
#   TPU_NAME=maepp ZONE=us-central2-b ACCELERATOR_TYPE=v4-64 BUCKET=my-bucket \
#     launch/tpu_pod.sh run configs/base.py /gcs/runs/base --config.data.data_dir=/gcs/audioset_tfds
set -euo pipefail

TPU_NAME=${TPU_NAME:-audiomaepp}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUCKET=${BUCKET:-}
SPOT=${SPOT:-0}

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

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

case "$ACTION" in
  create)
    EXTRA=()
    [[ "$SPOT" == 1 ]] && EXTRA+=(--spot)
    run "${GCLOUD[@]}" create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${EXTRA[@]}"
    ;;
  setup)
    MOUNT=""
    if [[ -n "$BUCKET" ]]; then
      MOUNT="sudo mkdir -p /gcs && sudo chown \$USER /gcs && (mountpoint -q /gcs || gcsfuse --implicit-dirs $BUCKET /gcs) && "
    fi
    ARCHIVE=/tmp/audiomaepp-src.tar.gz
    run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
    run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU_NAME:audiomaepp-src.tar.gz" "${LOCATION[@]}" --worker=all
    on_all_workers "${MOUNT}mkdir -p audiomaepp && tar xzf audiomaepp-src.tar.gz -C audiomaepp && cd audiomaepp && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
    ;;
  run)
    if [[ $# -lt 2 ]]; then
      echo "usage: $0 [--dry-run] run CONFIG WORKDIR [--config.field=value ...]" >&2
      exit 2
    fi
    CONFIG=$1; WORKDIR=$2; shift 2
    ARGS=$(printf '%q ' --distributed "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
    # Every host runs the same command; each logs to its own file next to the checkout.
    on_all_workers "set -o pipefail; cd audiomaepp && .venv/bin/python main.py $ARGS 2>&1 | tee -a train_\$(hostname).log"
    ;;
  delete)
    run "${GCLOUD[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet
    ;;
  *)
    echo "usage: $0 [--dry-run] {create|setup|run CONFIG WORKDIR [overrides]|delete}" >&2
    exit 2
    ;;
esac
