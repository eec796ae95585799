#!/usr/bin/env bash
# Show (and follow) the log of a run on one worker: WORKER (default 0), RUN_NAME (default the
# run started last), LINES (default 100), FOLLOW=0 to print and return.
# Usage: RUN_NAME=retro_172m WORKER=3 tpu/logs.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${WORKER:=0}"
: "${LINES:=100}"
: "${FOLLOW:=1}"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "WORKER=$WORKER: use a worker number or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "LINES=$LINES: use a number"
LOGS="$(quote "$REMOTE_LOGS")"
if [[ -n "${RUN_NAME:-}" ]]; then
  LOG="$(quote "$REMOTE_LOGS/$(run_name logs).log")"
else
  LOG="\"$LOGS/\$(cat $LOGS/current).log\""
fi
TAIL="tail -n $LINES"
[[ "$FOLLOW" == 1 ]] && TAIL+=" -F"
tpu_ssh "$WORKER" "$TAIL $LOG"
