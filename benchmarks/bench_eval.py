"""Evaluation throughput: tokens scored per second by the jitted per-token loss, with and without
retrieval, and the cost of the leakage measure r(C) on the host.

    python benchmarks/bench_eval.py [--preset tiny] [--seq-len 256] [--batch 8] [--k 2]
        [--stored 4] [--workdir W --config experiments/X.py]

Scoring: retro_jax.evaluate.TokenScorer on random batches [batch, seq_len] of a randomly
initialised model (one mesh over all devices, batch split over them, as `retro-jax eval` runs
it); compilation excluded; per-token losses read back to the host each batch, as eval does.
Leakage: retro_jax.leakage.chunk_overlap on random tokens against --stored neighbours per chunk
(the eval pass computes it once per batch for all modes), at the preset's chunk size and at the
paper's shapes (m = 64, n = 2048, 10 neighbours). With --workdir, `evaluate` runs end to end on
that prepared, trained workdir and its own timing is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from retro_jax.config import default_config
from retro_jax.evaluate import TokenScorer
from retro_jax.leakage import chunk_overlap
from retro_jax.model import RetroConfig
from retro_jax.model.create import create_model
from retro_jax.sharding import make_mesh, shard_batch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scoring(config: RetroConfig, batch: int, seq_len: int, k: int, repeats: int) -> dict:
    mesh = make_mesh(default_config().mesh)
    scorer = TokenScorer(create_model(config, mesh=mesh))
    m = config.chunk_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    host = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "neighbours": rng.integers(1, config.vocab_size, (batch, seq_len // m, k, 2 * m)).astype(
            np.int32
        ),
    }
    out = {}
    with jax.set_mesh(mesh):
        placed = shard_batch(host, mesh)
        for name, kk in (("retrieval", k), ("no_retrieval", 0)):
            np.asarray(scorer(placed, kk))  # compile
            seconds = _median_time(lambda kk=kk: np.asarray(scorer(placed, kk)), repeats)
            out[f"{name}_tokens_per_s"] = round(batch * seq_len / seconds, 1)
    return out


def leakage(seq_len: int, chunk: int, stored: int, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1000, (batch, seq_len))
    neighbours = rng.integers(1, 1000, (batch, seq_len // chunk, stored, 2 * chunk))
    seconds = _median_time(lambda: chunk_overlap(tokens, neighbours, 0), repeats)
    return {
        "seq_len": seq_len,
        "chunk_size": chunk,
        "neighbours": stored,
        "tokens_per_s": round(batch * seq_len / seconds, 1),
    }


def workdir_run(config_path: str, workdir: str) -> dict:
    import importlib.util

    from retro_jax.evaluate import evaluate

    spec = importlib.util.spec_from_file_location("bench_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = evaluate(module.get_config(), workdir, progress=False)
    return {
        "scored_tokens": metrics["retrieval"]["tokens"],
        "retrieval_bpb": metrics["retrieval"]["bpb"],
        **metrics["timing"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--stored", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--config", default="")
    args = parser.parse_args()
    config = RetroConfig.preset(args.preset)
    out = {
        "machine": {
            "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
        },
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "k": args.k,
        "scoring": scoring(config, args.batch, args.seq_len, args.k, args.repeats),
        "leakage": [
            leakage(args.seq_len, config.chunk_size, args.stored, args.batch, args.repeats),
            leakage(2048, 64, 10, args.batch, args.repeats),
        ],
    }
    if args.workdir:
        out["workdir"] = workdir_run(args.config, args.workdir)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
