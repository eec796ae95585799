# shellcheck shell=bash
# Sourced by every tpu/ script: settings, dry-run printing, and the gcloud wrappers.
# DRY_RUN=1 prints each gcloud command (quoted as the shell reads it) instead of running it.

set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_DIR="$(dirname "$TPU_DIR")"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "${TPU_ENV:-$TPU_DIR/env.sh}"

: "${DRY_RUN:=0}"
: "${GCLOUD:=gcloud}"

# gcloud names v5e slices v5litepod-N and v6e slices v6e-N.
ACCELERATOR_TYPE="${ACCELERATOR/#v5e-/v5litepod-}"

default_runtime_version() {
  case "$ACCELERATOR_TYPE" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "ACCELERATOR=$ACCELERATOR: unknown TPU generation (set RUNTIME_VERSION)" ;;
  esac
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# One argument quoted for the shell, exactly as Python's shlex.quote does.
quote() {
  local s=$1 q="'\"'\"'"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# All arguments quoted and joined by spaces (Python's shlex.join).
join_quoted() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

gcloud_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    join_quoted gcloud "$@"
    echo
  else
    "$GCLOUD" "$@"
  fi
}

LOCATION=(--zone="$ZONE" --project="$PROJECT")

# tpu_ssh WORKER REMOTE_COMMAND: run a shell command on one worker (0, 1, ...) or on all.
tpu_ssh() {
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# tpu_scp LOCAL_FILE REMOTE_PATH: copy a file to every worker.
tpu_scp() {
  gcloud_run compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${LOCATION[@]}" --worker=all
}

# The run's name: RUN_NAME, else the last part of a --workdir argument, else the command.
run_name() {
  local command=$1 arg workdir=""
  shift
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      --workdir) workdir="${1:-}" ;;
    esac
  done
  workdir="${workdir%/}"
  local name="${RUN_NAME:-${workdir##*/}}"
  name="${name:-$command}"
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "run name '$name': use letters, digits, '.', '_', '-'"
  printf '%s' "$name"
}
