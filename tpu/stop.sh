#!/usr/bin/env bash
# Stop a run on every worker: SIGTERM (training saves a checkpoint first), or SIGKILL with
# FORCE=1. RUN_NAME defaults to the run started last.
# Usage: tpu/stop.sh       RUN_NAME=retro_172m FORCE=1 tpu/stop.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SIGNAL=TERM
[[ "${FORCE:-0}" == 1 ]] && SIGNAL=KILL
LOGS="$(quote "$REMOTE_LOGS")"
if [[ -n "${RUN_NAME:-}" ]]; then
  PID_FILE="$(quote "$REMOTE_LOGS/$(run_name stop).pid")"
else
  PID_FILE="\"$LOGS/\$(cat $LOGS/current).pid\""
fi
tpu_ssh all "if [ -f $PID_FILE ]; then kill -$SIGNAL \"\$(cat $PID_FILE)\" || true; rm -f $PID_FILE; fi"
