"""What the input pipeline costs the train step: live tf.data batches vs batches held in memory.

    python benchmarks/bench_pipeline.py [--steps 30] [--rounds 5] [--batch_size 8] [--seq_len 256]

Writes neighbour shards in the record schema (random tokens, tiny preset: chunk 16, K=4 stored,
k=2 used) to a temporary folder, then measures on the default device(s):
  - pipeline alone: examples/s of TrainBatches (parse, select neighbours, batch) after warm-up;
  - the train step fed from memory: the same batches, already numpy, through shard_batch + step;
  - the train step fed by the live pipeline, exactly as retro_jax.train.loop does it (the next
    batch is read while the device runs the current step).
Memory and pipeline runs alternate for --rounds rounds so that load from other processes hits
both alike; the fastest round of each is compared (medians shown too). Prints one JSON object:
pipeline_overhead = step_s_pipeline / step_s_memory - 1; pipeline_cpu_share = the time the
pipeline alone needs per batch / the step time (what it can cost at most when run serially).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from retro_jax.config import default_config, model_config
from retro_jax.data.pipeline import TrainBatches
from retro_jax.data.records import RecordSpec, write_records, write_records_info
from retro_jax.model.create import create_model
from retro_jax.sharding import make_mesh, shard_batch
from retro_jax.train.state import init_state
from retro_jax.train.step import batch_shardings, make_optimizer, make_train_step


def write_shards(folder: str, spec: RecordSpec, vocab: int, files: int, per_file: int) -> None:
    rng = np.random.default_rng(0)
    n, c, k, m = spec.seq_len, spec.num_chunks, spec.num_neighbours, spec.chunk_size
    doc = 0
    for f in range(files):
        examples = []
        for _ in range(per_file):
            examples.append(
                {
                    "tokens": rng.integers(1, vocab, n + 1),
                    "loss_mask": np.ones(n, np.int64),
                    "target_bytes": rng.integers(1, 6, n),
                    "neighbours": rng.integers(1, vocab, c * k * 2 * m),
                    "neighbour_ids": rng.integers(0, 10**6, c * k),
                    "doc_id": np.array([doc]),
                    "offset": np.array([0]),
                }
            )
            doc += 1
        write_records(os.path.join(folder, f"train-{f:05d}-of-{files:05d}.tfrecord"), examples)
    write_records_info(folder, {**spec.to_dict(), "pad_id": 0, "vocab_size": vocab})


def timed_steps(step, state, next_batch, mesh, steps: int, log_every: int = 10):
    """Seconds per step over `steps` steps (synchronising every log_every, as the loop does)."""
    batch = shard_batch(next_batch(), mesh)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batch)
        batch = shard_batch(next_batch(), mesh)
        if (i + 1) % log_every == 0:
            jax.device_get(metrics)
    jax.device_get(metrics)
    return state, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--per_file", type=int, default=256)
    args = parser.parse_args()

    config = default_config()  # the tiny preset
    config.train.batch_size = args.batch_size
    model_cfg = model_config(config)
    spec = RecordSpec(args.seq_len, model_cfg.chunk_size, int(config.data.num_neighbours_stored))
    k = int(config.train.num_neighbours)
    folder = tempfile.mkdtemp(prefix="bench_pipeline_")
    write_shards(folder, spec, model_cfg.vocab_size, args.files, args.per_file)

    def stream(start=0):
        return TrainBatches(
            folder,
            global_batch=args.batch_size,
            num_neighbours=k,
            seed=0,
            shuffle_buffer=1024,
            start=start,
        )

    # Pipeline alone.
    batches = stream()
    for _ in range(5):
        next(batches)
    count = min(200, batches.batches_per_epoch * 2)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    pipeline_examples_s = count * args.batch_size / (time.perf_counter() - start)

    # The step, fed from memory and from the live pipeline.
    mesh = make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.train)
    model_def, state, shardings = init_state(create_model(model_cfg, mesh=mesh), tx, mesh=mesh)
    held = list(_take(stream(), args.steps + 2))  # numpy batches, read before timing
    with jax.set_mesh(mesh):
        step = make_train_step(
            model_def,
            tx,
            schedule,
            retrieval=True,
            state_shardings=shardings,
            batch_shardings=batch_shardings(shard_batch(held[0], mesh), mesh),
        )
        state, _ = timed_steps(step, state, iter(held).__next__, mesh, 5)  # compile + warm up
        memory, live = [], []
        for _ in range(args.rounds):
            it = iter(held)
            state, seconds = timed_steps(step, state, it.__next__, mesh, args.steps)
            memory.append(seconds)
            live_stream = stream(start=7)
            state, seconds = timed_steps(step, state, live_stream.__next__, mesh, args.steps)
            live.append(seconds)
    # The minimum is the estimate least disturbed by other processes; the median is shown too.
    memory_s, live_s = min(memory), min(live)
    shutil.rmtree(folder, ignore_errors=True)
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
                "model": "tiny",
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "num_neighbours": k,
                "pipeline_examples_per_s": round(pipeline_examples_s, 1),
                "step_examples_per_s": round(args.batch_size / live_s, 1),
                "step_s_memory": round(memory_s, 5),
                "step_s_pipeline": round(live_s, 5),
                "step_s_memory_rounds": [round(x, 5) for x in memory],
                "step_s_pipeline_rounds": [round(x, 5) for x in live],
                "pipeline_overhead": round(live_s / memory_s - 1, 4),
                "pipeline_overhead_median": round(
                    statistics.median(live) / statistics.median(memory) - 1, 4
                ),
                "pipeline_cpu_share": round(args.batch_size / pipeline_examples_s / live_s, 5),
            },
            indent=2,
        )
    )


def _take(iterator, count):
    for _ in range(count):
        yield next(iterator)


if __name__ == "__main__":
    main()
