#!/usr/bin/env bash
# Run a training command and start it again after preemption or host loss, with bounded retries
# and exponential backoff. Each start resumes from the workdir's latest checkpoint.
#
#   launch/supervise.sh [--max_restarts N] [--backoff SECONDS] [--dry-run] -- COMMAND [ARGS...]
#   launch/supervise.sh -- python main.py --config=configs/base.py --workdir=gs://bucket/runs/base
#
# One supervisor per process (per host on TPU pods, per process on a local multi-process run).
# Restarts on exit status 75 (another host was lost), 143 (stopped by SIGTERM after a checkpoint,
# e.g. a maintenance event) and on death by a signal (128 + N: killed, or JAX's abort when the
# coordinator disappears). Gives up, returning the status, on 0 (done), on any other status (1:
# a user or training error that a restart would repeat) and after N restarts. SIGTERM or SIGINT
# to the supervisor is passed to the command, and the supervisor then stops with its status.
# Status 134 (SIGABRT) is reported as `error: the command aborted (status 134); last checkpoint:
# step C`, C read from the --workdir's checkpoints/ (local workdirs; on gs:// it names the
# directory to list). It is also how JAX's client ends a process whose coordinator (process 0) is
# gone: when the command's standard error says so (JAX's "distributed service detected fatal
# errors"), the line names the lost coordinator. The command's standard error still reaches the
# supervisor's; a copy of the last start's is kept in a temporary file for this check.
# Waits BACKOFF, 2 x BACKOFF, ... (at most 300 s) before each restart: the first wait must exceed
# the time the other hosts take to notice a loss (main.py --host_timeout_seconds, 8 s) so that
# every host has left the old run before any joins the new one.
set -uo pipefail

MAX_RESTARTS=${MAX_RESTARTS:-5}
BACKOFF=${BACKOFF:-20}
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max_restarts) MAX_RESTARTS=$2; shift 2 ;;
    --backoff) BACKOFF=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [--max_restarts N] [--backoff SECONDS] [--dry-run] -- COMMAND [ARGS...]" >&2
  exit 2
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "max_restarts=$MAX_RESTARTS backoff=${BACKOFF}s"
  printf '%q ' "$@"; echo
  exit 0
fi

log() { echo "supervise: $*" >&2; }

# The value of the command's --workdir flag (--workdir=DIR or --workdir DIR).
workdir_of() {
  local previous=""
  for arg in "$@"; do
    case "$arg" in --workdir=*) echo "${arg#--workdir=}"; return ;; esac
    [[ $previous == --workdir ]] && { echo "$arg"; return; }
    previous=$arg
  done
}

# The newest complete checkpoint step of a local workdir (Orbax renames a step's directory to
# its number once the save is complete), "none", or what to list for a remote one.
latest_checkpoint() {
  local workdir=$1
  if [[ -z $workdir ]]; then echo "unknown (no --workdir)"; return; fi
  if [[ $workdir == *://* ]]; then echo "see $workdir/checkpoints"; return; fi
  local step
  step=$(ls "$workdir/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1)
  echo "${step:-none}"
}

WORKDIR=$(workdir_of "$@")
ERRLOG=$(mktemp "${TMPDIR:-/tmp}/supervise.XXXXXX")
trap 'rm -f "$ERRLOG"' EXIT
COORDINATOR_LOST="JAX distributed service detected fatal errors"

CHILD=0
STOPPING=0
forward() {
  STOPPING=1
  [[ $CHILD -gt 0 ]] && kill -TERM "$CHILD" 2>/dev/null
}
trap forward TERM INT

attempt=0
delay=$BACKOFF
while true; do
  : > "$ERRLOG"
  "$@" 2> >(tee -a "$ERRLOG" >&2) &
  CHILD=$!
  # A signal that came before CHILD was set found nothing to forward: forward it now.
  [[ $STOPPING == 1 ]] && kill -TERM "$CHILD" 2>/dev/null
  # `wait` returns early when a trapped signal arrives: wait again until the command has ended.
  while true; do
    wait "$CHILD"
    status=$?
    kill -0 "$CHILD" 2>/dev/null || break
  done
  CHILD=0
  if [[ $STOPPING == 1 ]]; then
    log "stopped by a signal; the command exited with status $status"
    exit "$status"
  fi
  if [[ $status == 134 ]]; then
    sleep 0.2  # tee copies the command's last lines
    cause=""
    grep -q "$COORDINATOR_LOST" "$ERRLOG" && cause=", as JAX does when the coordinator (process 0) is lost"
    printf '\nerror: the command aborted (status 134)%s; last checkpoint: step %s\n' \
      "$cause" "$(latest_checkpoint "$WORKDIR")" >&2
  fi
  case "$status" in
    0) exit 0 ;;
    75|143) reason="status $status" ;;
    134) reason="an abort (status 134)" ;;
    *) if [[ $status -gt 128 ]]; then reason="signal $((status - 128))"; else
         log "the command failed with status $status: not restarting"; exit "$status"; fi ;;
  esac
  if [[ $attempt -ge $MAX_RESTARTS ]]; then
    log "the command ended with $reason after $attempt restarts: giving up"
    exit "$status"
  fi
  attempt=$((attempt + 1))
  log "the command ended with $reason; restart $attempt of $MAX_RESTARTS in ${delay}s"
  sleep "$delay" &
  SLEEPER=$!
  wait "$SLEEPER"
  kill "$SLEEPER" 2>/dev/null
  if [[ $STOPPING == 1 ]]; then exit "$status"; fi
  delay=$((delay * 2 > 300 ? 300 : delay * 2))
done
