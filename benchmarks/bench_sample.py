"""Sampling speed: incremental decoding (KV cache) vs full recomputation, and the per-chunk cost
of live retrieval split into embed, search and encode.

    python benchmarks/bench_sample.py [--preset tiny] [--model KEY=VALUE ...] [--lengths 512 2048]
        [--k 2] [--index-sizes 10000 200000] [--workdir W --config experiments/X.py]
        [--decode-only] [--batch 1 8]

Decoding: a randomly initialised model of the preset generates --lengths tokens (batch 1) with
random neighbours passed at every chunk end, (a) through retro_jax.model.decode.Decoder (one
position per step) and (b) by running the whole fixed-length sequence through the model for
every new token (jitted once; causality makes the padded tail irrelevant); (b) is timed on
--full-steps steps and its rate extrapolated; and (c) as a prompt, the whole sequence fed in one
`Decoder.prefill` call (prefill_tokens_per_s; prefill_speedup = (a)'s time / (c)'s, what
feeding a prompt of that length at once saves over one step per token). Compilation is excluded
from all three.

Retrieval per chunk: embed = the frozen all-MiniLM-L6-v2 on one chunk text (batch 1, as the
sampler runs it); search = NeighbourIndex.search for one query over --index-sizes random keys
(exact below retrieval.index.brute_force_below = 20,000 keys, ScaNN above); encode = a decoder
step that encodes k neighbours minus a plain step. With --workdir, Sampler.from_workdir runs
end to end on that prepared, trained workdir too. `--model num_layers=12 d_model=256 ...`
overrides the preset's fields; `--decode-only` times the decoding alone (cached tokens/s, and
full recomputation unless --full-steps 0); `--batch 1 8` decodes that many rows at once (as
`retro-jax sample --prompts` does; tokens/s counts every row). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.model import Retro, RetroConfig
from retro_jax.model.decode import Decoder


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rates(config: RetroConfig, length: int, k: int, full_steps: int, batch: int = 1) -> dict:
    """tokens/s (all rows together) generating `length` tokens per row with the cache, feeding
    them as a prompt in one call, and (batch 1) by full recomputation."""
    model = Retro(config, rngs=nnx.Rngs(0))
    m = config.chunk_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (batch, length)).astype(np.int32)
    shape = (batch, length // m, k, 2 * m)
    neighbours = rng.integers(1, config.vocab_size, shape).astype(np.int32)
    decoder = Decoder(model)

    def cached() -> None:
        cache = decoder.init_cache(batch, length, k)
        logits = None
        for t in range(length):
            nb = jnp.asarray(neighbours[:, t // m]) if (t + 1) % m == 0 else None
            logits, cache = decoder.step(cache, jnp.asarray(tokens[:, t]), nb)
            np.asarray(jnp.argmax(logits, -1))  # the sampler reads every token back to the host
        jax.block_until_ready(logits)

    cached()  # compile both step variants
    cached_s = _median_time(cached, 1)

    def prefill() -> None:  # the same tokens as prompts, fed in one call
        cache = decoder.init_cache(batch, length, k)
        logits, _ = decoder.prefill(cache, tokens, neighbours)
        np.asarray(jnp.argmax(logits, -1))

    prefill()  # compile
    prefill_s = _median_time(prefill, 3)
    rates = {
        "length": length,
        "batch": batch,
        "cached_tokens_per_s": round(batch * length / cached_s, 1),
        "prefill_tokens_per_s": round(batch * length / prefill_s, 1),
        "prefill_speedup": round(cached_s / prefill_s, 1),
    }
    if not full_steps or batch > 1:
        return rates
    graphdef, state = nnx.split(model)

    @jax.jit
    def full(state, tokens, neighbours, t):
        logits = nnx.merge(graphdef, state)(tokens, neighbours)
        return jnp.argmax(logits[0, t])

    seq = jnp.asarray(tokens)
    nb = jnp.asarray(neighbours)
    full(state, seq, nb, 0).block_until_ready()
    positions = np.linspace(0, length - 1, full_steps).astype(int)
    start = time.perf_counter()
    for t in positions:
        int(full(state, seq, nb, int(t)))
    full_s = (time.perf_counter() - start) / full_steps * length
    return rates | {
        "full_recompute_tokens_per_s": round(length / full_s, 2),
        "speedup": round(full_s / cached_s, 1),
    }


def encode_ms(config: RetroConfig, k: int, max_len: int = 512, repeats: int = 20) -> dict:
    """Decoder step with k neighbours to encode vs a plain step (ms)."""
    decoder = Decoder(Retro(config, rngs=nnx.Rngs(0)))
    m = config.chunk_size
    token = jnp.asarray([1], jnp.int32)
    neighbours = jnp.ones((1, k, 2 * m), jnp.int32)
    cache = decoder.init_cache(1, max_len, k)
    for _ in range(m):  # reach a chunk end; compile both variants
        _, cache = decoder.step(cache, token, None)
    _, cache = decoder.step(cache, token, neighbours)

    def plain():
        nonlocal cache
        logits, cache = decoder.step(cache, token, None)
        logits.block_until_ready()

    def with_neighbours():
        nonlocal cache
        logits, cache = decoder.step(cache, token, neighbours)
        logits.block_until_ready()

    a, b = _median_time(plain, repeats), _median_time(with_neighbours, repeats)
    return {"plain_step_ms": round(a * 1e3, 3), "encode_ms": round(max(b - a, 0.0) * 1e3, 3)}


def embed_ms(chunk_words: int, repeats: int) -> dict:
    from bench_embed import sotu_chunks

    from retro_jax.retrieval import ChunkEmbedder

    embedder = ChunkEmbedder.from_pretrained(batch_size=1)
    texts = sotu_chunks(chunk_words, limit=repeats + 1)
    embedder.embed(texts[:1])
    times = []
    for text in texts[1:]:
        start = time.perf_counter()
        embedder.embed([text])
        times.append(time.perf_counter() - start)
    return {"chunk_words": chunk_words, "embed_ms": round(statistics.median(times) * 1e3, 2)}


def search_ms(size: int, k: int, dim: int = 384, repeats: int = 50) -> dict:
    from retro_jax.retrieval import NeighbourIndex

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((size, dim)).astype(np.float32)
    start = time.perf_counter()
    index = NeighbourIndex.build(keys, progress=False)
    built = time.perf_counter() - start
    queries = rng.standard_normal((repeats + 1, dim)).astype(np.float32)
    index.search(queries[:1], k)
    times = []
    for q in queries[1:]:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    kinds = sorted({s.kind for s in index.shards})
    return {
        "keys": size,
        "kind": "+".join(kinds),
        "build_s": round(built, 2),
        "search_ms": round(statistics.median(times) * 1e3, 3),
    }


def workdir_run(config_path: str, workdir: str, tokens: int) -> dict:
    import importlib.util

    from retro_jax.sample.sampler import Sampler

    spec = importlib.util.spec_from_file_location("bench_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sampler = Sampler.from_workdir(module.get_config(), workdir)
    sampler.generate("The state of the Union", max_new_tokens=tokens, temperature=0)  # compile
    result = sampler.generate("The state of the Union", max_new_tokens=tokens, temperature=0)
    total = sum(result.seconds.values())
    chunks = max(len(result.chunks), 1)
    return {
        "generated": len(result.tokens),
        "retrievals": len(result.chunks),
        "tokens_per_s": round(len(result.tokens) / total, 1),
        "per_chunk_ms": {
            name: round(value / chunks * 1e3, 2)
            for name, value in result.seconds.items()
            if name not in ("prefill", "decode")
        },
        "prefill_s": round(result.seconds["prefill"], 3),
        "decode_s": round(result.seconds["decode"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--full-steps", type=int, default=32)
    parser.add_argument("--index-sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--chunk-words", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--config", default="")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.model)

    def value(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a bare string: dtype=bfloat16

    config = RetroConfig.preset(args.preset).replace(
        **{key: value(text) for key, text in overrides.items()}
    )
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "devices": [str(d) for d in jax.devices()],
        },
        "preset": args.preset,
        "model": overrides,
        "k": args.k,
        "decode": [
            decode_rates(config, n, args.k, args.full_steps, b)
            for b in args.batch
            for n in args.lengths
        ],
    }
    if args.decode_only:
        print(json.dumps(out, indent=1))
        return
    out["retrieval_per_chunk"] = {
        **embed_ms(args.chunk_words, args.repeats),
        "search": [search_ms(n, args.k) for n in args.index_sizes],
        **encode_ms(config, args.k),
    }
    if args.workdir:
        out["workdir"] = workdir_run(args.config, args.workdir, 64)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
