"""NeighbourIndex on real BERT keys: recall@10 against exact search, and queries per second.

    python benchmarks/bench_index.py [--sizes 100000 1000000] [--base 4096] [--queries 512]

Keys are all-MiniLM-L6-v2 embeddings of State of the Union chunks (48 words each, picked at
random over all addresses). To reach --sizes keys, the --base real keys are repeated with
Gaussian noise whose norm is --noise times the median nearest-neighbour distance among them,
so copies spread into their neighbourhood instead of stacking on one point. Queries are keys of
other real chunks, not in the database. Exact search is NeighbourIndex with one exact shard (a
numpy matmul); the approximate one uses build()'s defaults unless overridden. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from bench_embed import sotu_chunks

from retro_jax.retrieval import ChunkEmbedder, NeighbourIndex


def real_keys(count: int, cache: str) -> np.ndarray:
    """Keys of `count` random sotu chunks [count, D] (read from / written to `cache` if given)."""
    if cache and os.path.exists(cache):
        keys = np.load(cache)
        if len(keys) >= count:
            return keys[:count]
    texts = sotu_chunks(48)
    pick = np.random.default_rng(0).permutation(len(texts))[:count]
    keys = ChunkEmbedder.from_pretrained().embed([texts[i] for i in pick], progress=True)
    if cache:
        np.save(cache, keys)
    return keys


def median_nn_distance(keys: np.ndarray) -> float:
    _, dist = NeighbourIndex.build(keys, brute_force_below=len(keys) + 1, progress=False).search(
        keys[:512], 2
    )
    return float(np.median(np.sqrt(dist[:, 1])))


def database(base: np.ndarray, size: int, noise: float, seed: int = 0) -> np.ndarray:
    """[size, D]: base rows repeated, all but the first copy moved by Gaussian noise."""
    rng = np.random.default_rng(seed)
    sigma = noise * median_nn_distance(base) / np.sqrt(base.shape[1])
    reps = -(-size // len(base))
    db = np.tile(base, (reps, 1))[:size]
    db[len(base) :] += rng.normal(scale=sigma, size=db[len(base) :].shape).astype(np.float32)
    return db


def timed_search(index: NeighbourIndex, queries: np.ndarray, k: int, repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return out, len(queries) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--base", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--keys_cache", default="", help=".npy of real keys to reuse")
    parser.add_argument("--num_leaves", type=int, default=0)
    parser.add_argument("--leaves_to_search", type=int, default=0)
    parser.add_argument("--reorder", type=int, default=0)
    args = parser.parse_args()

    keys = real_keys(args.base + args.queries, args.keys_cache)
    base, queries = keys[: args.base], keys[args.base :]
    results = []
    for size in args.sizes:
        db = database(base, size, args.noise)
        exact = NeighbourIndex.build(db, brute_force_below=size + 1, progress=False)
        (exact_ids, _), exact_qps = timed_search(exact, queries, args.k, repeats=1)
        del exact
        t = time.perf_counter()
        approx = NeighbourIndex.build(
            db,
            num_leaves=args.num_leaves,
            leaves_to_search=args.leaves_to_search,
            reorder=args.reorder,
            progress=False,
        )
        build_s = time.perf_counter() - t
        (ids, _), qps = timed_search(approx, queries, args.k)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids)])
        params = approx.shards[0].params
        results.append(
            dict(
                keys=size,
                dim=int(db.shape[1]),
                shards=[s.kind for s in approx.shards],
                params=None if params is None else params.__dict__,
                build_s=round(build_s, 1),
                recall_at_k=round(float(recall), 4),
                queries_per_s=round(qps, 1),
                exact_queries_per_s=round(exact_qps, 1),
                speedup=round(qps / exact_qps, 1),
            )
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress; stdout: summary
    summary = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cpus",
        base_real_keys=len(base),
        queries=len(queries),
        k=args.k,
        noise=args.noise,
        results=results,
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
