#!/usr/bin/env bash
# Start `retro-jax COMMAND ARGS...` on every worker at once (--worker=all); each process joins
# the slice with jax.distributed.initialize(). Output goes to REMOTE_LOGS/RUN_NAME.log on each
# worker. By default the command runs in the background (nohup; its pid in RUN_NAME.pid, so
# tpu/stop.sh can end it); WAIT=1 runs it in the foreground and returns its exit status (used by
# `retro-jax sweep --launcher=tpu`). RUN_NAME defaults to the last part of --workdir.
# Usage: tpu/run.sh train --config experiments/retro_172m.py --workdir gs://BUCKET/retro_172m
#        REMOTE_ENV='XLA_FLAGS=--xla_dump_to=/tmp/x' tpu/run.sh ...   (variables for the workers)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# >= 1)) || die "usage: tpu/run.sh COMMAND [--config CFG] [--workdir gs://...] [ARGS...]"
NAME="$(run_name "$@")"
: "${WAIT:=0}"
: "${REMOTE_ENV:=}"

ENV_WORDS=()
if [[ -n "$REMOTE_ENV" ]]; then
  read -r -a ENV_WORDS <<<"$REMOTE_ENV"
  for word in "${ENV_WORDS[@]}"; do
    [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "REMOTE_ENV: '$word' is not NAME=VALUE"
  done
fi

LOG="$(quote "$REMOTE_LOGS/$NAME.log")"
PID="$(quote "$REMOTE_LOGS/$NAME.pid")"
COMMAND="retro-jax $(join_quoted "$@")"
if ((${#ENV_WORDS[@]})); then
  COMMAND="env $(join_quoted "${ENV_WORDS[@]}") $COMMAND"
fi
PREFIX="cd $(quote "$REMOTE_DIR") && . ../$(quote "$REMOTE_VENV")/bin/activate"
PREFIX+=" && mkdir -p ../$(quote "$REMOTE_LOGS") && echo $(quote "$NAME") > ../$(quote "$REMOTE_LOGS")/current"
if [[ "$WAIT" == 1 ]]; then
  REMOTE="set -o pipefail; $PREFIX && $COMMAND 2>&1 | tee ../$LOG"
else
  REMOTE="$PREFIX && (nohup $COMMAND > ../$LOG 2>&1 < /dev/null & echo \$! > ../$PID)"
fi
tpu_ssh all "$REMOTE"
if [[ "$WAIT" != 1 && "$DRY_RUN" != 1 ]]; then
  echo "run.sh: started '$NAME' on every worker of $TPU_NAME; follow it with RUN_NAME=$NAME tpu/logs.sh" >&2
fi
