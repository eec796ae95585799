"""Compile time of the training gradient at the paper's layer structures, unrolled vs scanned.

    python benchmarks/bench_compile.py [--presets 172m,1.5b,7.5b] [--seq-len 2048] [--decode]

For each preset: the gradient of the training loss (`lower_loss_grad`, bfloat16 compute, remat
on, as in experiments/paper.py) is lowered and compiled from abstract shapes (nothing is
allocated), once with `scan_layers=False` (every layer in the program) and once with
`scan_layers=True`. Reports lowering and compile seconds and the number of matrix products
(`dot_general`) in the lowered program: a deterministic measure of how much code XLA compiles.

`--decode` compiles the sampler's incremental decoding step instead (`retro_jax.model.decode`,
batch 1, a cache of --seq-len positions, bfloat16), without and with neighbours to encode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from retro_jax.model import RetroConfig
from retro_jax.model.create import lower_loss_grad


def timed_compile(lower) -> dict:
    """Seconds to lower (`lower()` -> jax.stages.Lowered) and to compile, and the matrix
    products of the lowered program."""
    start = time.perf_counter()
    lowered = lower()
    lower_s = time.perf_counter() - start
    dots = lowered.as_text().count("stablehlo.dot_general")
    start = time.perf_counter()
    lowered.compile()
    return {
        "lower_s": round(lower_s, 2),
        "compile_s": round(time.perf_counter() - start, 2),
        "dot_generals": dots,
    }


def compile_grad(config: RetroConfig, batch: int, seq_len: int, k: int) -> dict:
    return timed_compile(
        lambda: lower_loss_grad(config, batch=batch, seq_len=seq_len, neighbours=k)
    )


def compile_decode(config: RetroConfig, seq_len: int, k: int) -> dict:
    """Lower and compile the decoding step from abstract shapes: a plain step, one that encodes
    a completed chunk's k neighbours, and the prompt's call (prefill) over the whole cache."""
    import jax.numpy as jnp
    from flax import nnx

    from retro_jax.model import decode
    from retro_jax.model.create import abstract_model

    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: decode.init_cache(model, 1, seq_len, k))
    m = config.chunk_size
    shape = jax.ShapeDtypeStruct
    calls = {  # name: (tokens, neighbours, length)
        "plain": (shape((1, 1), jnp.int32), None, None),
        "encode": (shape((1, 1), jnp.int32), shape((1, 1, k, 2 * m), jnp.int32), None),
        "prefill": (
            shape((1, seq_len), jnp.int32),
            shape((1, seq_len // m, k, 2 * m), jnp.int32),
            shape((), jnp.int32),
        ),
    }
    return {
        name: timed_compile(
            lambda args=args: decode._jitted_feed.lower(graphdef, None, False, state, cache, *args)
        )
        for name, args in calls.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="172m,1.5b,7.5b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args()
    if args.decode:
        results = {
            "benchmark": "compile_decode",
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "cache_len": args.seq_len,
            "what": "decoding step and prefill (batch 1), bfloat16, from abstract shapes",
            "models": {},
        }
        for preset in args.presets.split(","):
            config = RetroConfig.preset(preset).replace(dtype="bfloat16")
            row = compile_decode(config, args.seq_len, args.neighbours)
            results["models"][preset] = row
            print(f"bench_compile: decode {preset}: {row}", file=sys.stderr, flush=True)
        print(json.dumps(results, indent=2))
        return
    results = {
        "benchmark": "compile",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "what": "jit(grad(token_nll loss)) of RETRO, bfloat16, remat, from abstract shapes",
        "models": {},
    }
    for preset in args.presets.split(","):
        base = RetroConfig.preset(preset).replace(dtype="bfloat16", remat=True)
        row = {"layers": base.num_layers, "cca_layers": list(base.cca_layers)}
        for name, scan in (("unrolled", False), ("scanned", True)):
            config = base.replace(scan_layers=scan)
            row[name] = compile_grad(config, args.batch, args.seq_len, args.neighbours)
        row["compile_unrolled_over_scanned"] = round(
            row["unrolled"]["compile_s"] / row["scanned"]["compile_s"], 2
        )
        results["models"][preset] = row
        print(f"bench_compile: {preset}: {row}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
