# shellcheck shell=bash
# Settings of the tpu/ scripts. Edit them here, or set any of them in the environment
# (`TPU_NAME=run2 tpu/create.sh`); another file can be used with TPU_ENV=path/to/env.sh.

: "${PROJECT:=my-gcp-project}"          # Google Cloud project
: "${ZONE:=us-east5-a}"                 # zone of the TPU (and, ideally, of the bucket)
: "${TPU_NAME:=retro-jax}"              # name of the TPU VM (node)
: "${ACCELERATOR:=v5p-128}"             # slice: v4-256, v5p-128, v5e-256 (= v5litepod-256), v6e-64
: "${RUNTIME_VERSION:=}"                # TPU software version; empty = chosen from ACCELERATOR
: "${CAPACITY:=on-demand}"              # on-demand | spot | reserved
: "${QUEUED:=1}"                        # 1: queued resource (waits for capacity); 0: tpu-vm create
: "${QUEUED_RESOURCE:=${TPU_NAME}-qr}"  # name of the queued resource when QUEUED=1
: "${BUCKET:=gs://my-bucket/retro_jax}" # where workdirs live: every worker must reach them

# Creation retries (capacity errors only): tries (0 = forever) and seconds between them.
: "${CREATE_TRIES:=0}"
: "${RETRY_SECONDS:=60}"
: "${POLL_SECONDS:=30}"                 # queued resource: seconds between state checks

# On the workers (paths relative to the home folder).
: "${REMOTE_DIR:=retro_jax}"            # the synced code
: "${REMOTE_VENV:=retro_jax_venv}"      # the virtual environment the package is installed in
: "${REMOTE_LOGS:=retro_jax_logs}"      # RUN_NAME.log and RUN_NAME.pid of each run
: "${REMOTE_PYTHON:=python3}"
: "${EXTRAS:=tpu,pipeline}"             # pip extras of the package to install
