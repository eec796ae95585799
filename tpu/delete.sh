#!/usr/bin/env bash
# Delete the TPU slice of env.sh (the queued resource and its node when QUEUED=1). Everything on
# the workers' disks is lost; workdirs on gs:// stay.
# Usage: tpu/delete.sh     (DRY_RUN=1 prints the gcloud command)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "$QUEUED" == 1 ]]; then
  gcloud_run compute tpus queued-resources delete "$QUEUED_RESOURCE" "${LOCATION[@]}" --force --quiet
else
  gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
