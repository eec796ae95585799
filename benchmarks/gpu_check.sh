#!/usr/bin/env bash
# The device check of issue #7 in one run: the train step's MFU at the 172m and 425m presets
# (bfloat16, sequence 2048, batch 4, no remat, synthetic batches) and sharded == single-device
# results. Batch 4: memory_plan puts batch 8 without remat near 84 GiB for 172m (an H100: 80).
# Then, if time allows, the 172m preset's decoding and prefill speed, 1 and 8 rows at once
# (decode_gpu.json; its failure does not fail the check).
# Needs no TensorFlow and no install: the repository root goes on PYTHONPATH (jax, flax, optax,
# etils and tqdm must be importable). Writes model_step_gpu.json to OUT_DIR (default $OUT).
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # PRESETS=tiny SEQ_LEN=256 for a dry run
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-/tmp}}
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# flax.nnx must import on this jax: flax 0.12.8/0.12.9 fail on jax 0.11.2 (jax.experimental.hijax
# changed); 0.12.10+ work. Carry a newer flax wheel (device README) if this line fails.
python3 -c "import jax, flax, optax; from flax import nnx; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  || { echo "gpu_check: flax.nnx does not import with this jax; carry flax>=0.12.10 (py3.12 wheel)" >&2; exit 1; }
python3 benchmarks/bench_model_step.py --presets "${PRESETS:-172m,425m}" \
  --seq-len "${SEQ_LEN:-2048}" --batch "${BATCH:-4}" --dtype bfloat16 --peak-size 8192 \
  --steps "${STEPS:-5}" --check | tee "$out_dir/model_step_gpu.json"
python3 benchmarks/bench_sample.py --decode-only --preset "${DECODE_PRESET:-172m}" --lengths 512 \
  --full-steps 8 --batch 1 8 --model dtype=bfloat16 > "$out_dir/decode_gpu.json" \
  || echo "gpu_check: the decoding benchmark failed (model_step_gpu.json stands)" >&2
