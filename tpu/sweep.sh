#!/usr/bin/env bash
# Run a config file's sweep on the TPU slice: each run's commands go, one after another, to
# tpu/run.sh (WAIT=1), each run in its own workdir under SWEEP_WORKDIR (default
# BUCKET/sweeps/NAME). Extra arguments go to `retro-jax sweep` (--sweep=A,B, --config.KEY=V).
# Usage: tpu/sweep.sh experiments/retro_172m.py --sweep=neighbours [--dry-run]
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(($# >= 1)) || die "usage: tpu/sweep.sh experiments/X.py[:arg] [--sweep=A,B] [--dry-run]"
CONFIG=$1
shift
NAME="$(basename "${CONFIG%%:*}" .py)"
: "${SWEEP_WORKDIR:=${BUCKET%/}/sweeps/$NAME}"
: "${PYTHON:=python3}"
cd "$REPO_DIR" || die "cannot enter $REPO_DIR"
exec "$PYTHON" -m retro_jax.cli sweep "$CONFIG" --launcher=tpu --workdir="$SWEEP_WORKDIR" "$@"
