#!/usr/bin/env bash
# Create the TPU slice named in env.sh: a queued resource (QUEUED=1, waits until ACTIVE) or a
# TPU VM (QUEUED=0). CAPACITY=spot or reserved picks the capacity; creation is retried on
# capacity errors (CREATE_TRIES, RETRY_SECONDS). An existing slice of that name is kept.
# Usage: tpu/create.sh        (DRY_RUN=1 prints the gcloud commands)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version)}"
case "$CAPACITY" in
  on-demand) CAPACITY_FLAGS=() ;;
  spot) CAPACITY_FLAGS=(--spot) ;;
  reserved) CAPACITY_FLAGS=(--reserved) ;;
  *) die "CAPACITY=$CAPACITY: use on-demand, spot or reserved" ;;
esac

if [[ "$QUEUED" == 1 ]]; then
  CREATE=(compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME"
    "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --runtime-version="$RUNTIME_VERSION" "${CAPACITY_FLAGS[@]}")
else
  CREATE=(compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${CAPACITY_FLAGS[@]}")
fi

CAPACITY_ERRORS='no more capacity|RESOURCE_EXHAUSTED|[Ii]nsufficient capacity|resource pool exhausted|ZONE_RESOURCE_POOL_EXHAUSTED|out of capacity'

create() {
  local try=1 errors
  errors="$(mktemp)"
  trap 'rm -f "$errors"' RETURN
  while true; do
    if gcloud_run "${CREATE[@]}" 2>"$errors"; then
      return 0
    fi
    cat "$errors" >&2
    if grep -q "already exists" "$errors"; then
      echo "create.sh: $TPU_NAME already exists; keeping it" >&2
      return 0
    fi
    if ! grep -Eq "$CAPACITY_ERRORS" "$errors"; then
      die "creating $TPU_NAME failed (not a capacity error, not retried)"
    fi
    if ((CREATE_TRIES > 0 && try >= CREATE_TRIES)); then
      die "no capacity for $ACCELERATOR_TYPE in $ZONE after $try tries"
    fi
    echo "create.sh: no capacity (try $try); retrying in ${RETRY_SECONDS}s" >&2
    try=$((try + 1))
    sleep "$RETRY_SECONDS"
  done
}

wait_until_active() {
  local state
  while true; do
    state="$(gcloud_run compute tpus queued-resources describe "$QUEUED_RESOURCE" \
      "${LOCATION[@]}" --format='value(state.state)')"
    [[ "$DRY_RUN" == 1 ]] && { echo "$state"; return 0; }
    case "$state" in
      ACTIVE) echo "create.sh: $QUEUED_RESOURCE is ACTIVE" >&2; return 0 ;;
      FAILED | SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state" ;;
    esac
    echo "create.sh: $QUEUED_RESOURCE is ${state:-unknown}; waiting ${POLL_SECONDS}s" >&2
    sleep "$POLL_SECONDS"
  done
}

create
if [[ "$QUEUED" == 1 ]]; then
  wait_until_active
fi
