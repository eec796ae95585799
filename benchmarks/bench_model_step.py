"""Forward + backward step of RETRO vs its baseline twin: tokens/s, FLOP/s and MFU.

    python benchmarks/bench_model_step.py [--presets tiny,172m] [--seq-len 256] [--steps 5]
    # on a GPU (no TensorFlow needed): the 172m and 425m presets at the paper's length
    python benchmarks/bench_model_step.py --presets 172m,425m --seq-len 2048 --batch 8 \
        --dtype bfloat16 --peak-size 8192

MFU is achieved model FLOP/s (analytic, retro_jax.model.info.flops_per_token) over the peak of a
large float32 matmul measured in the same run, so ratios between models are what to compare.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from retro_jax.model import Retro, RetroConfig
from retro_jax.model.info import flops_per_token
from retro_jax.train.metrics import measure_matmul_flops


def time_step(config: RetroConfig, batch: int, seq_len: int, k: int, steps: int) -> dict:
    model = Retro(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (batch, seq_len + 1)), jnp.int32)
    m = config.chunk_size
    neighbours = None
    if config.cca_layers:
        shape = (batch, seq_len // m, k, 2 * m)
        neighbours = jnp.asarray(rng.integers(1, config.vocab_size, shape), jnp.int32)

    @jax.jit
    def grad_step(params, tokens, neighbours):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1], neighbours)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, grads

    t = time.perf_counter()
    jax.block_until_ready(grad_step(params, tokens, neighbours))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(grad_step(params, tokens, neighbours))
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    flops = flops_per_token(config, seq_len, k if config.cca_layers else 0) * batch * seq_len
    return {
        "step_s": step,
        "compile_s": compile_s,
        "tokens_per_s": batch * seq_len / step,
        "flops_per_token": flops / (batch * seq_len),
        "flop_per_s": flops / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,172m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=0, help="0: 8 for tiny, 2 otherwise")
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    parser.add_argument("--peak-size", type=int, default=2048, help="8192 on a GPU/TPU")
    args = parser.parse_args()

    # The peak is measured in the compute dtype (bfloat16 on a GPU/TPU has its own peak).
    peak = measure_matmul_flops(args.peak_size, 10, dtype=args.dtype)
    results = {
        "benchmark": "model_step",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "matmul_peak_flop_per_s": peak,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "neighbours": args.neighbours,
        "models": {},
    }
    for preset in args.presets.split(","):
        retro = RetroConfig.preset(preset).replace(dtype=args.dtype)
        batch = args.batch or (8 if preset == "tiny" else 2)
        row = {"batch": batch}
        for name, config in (("baseline", retro.baseline()), ("retro", retro)):
            r = time_step(config, batch, args.seq_len, args.neighbours, args.steps)
            r["mfu"] = r["flop_per_s"] / peak
            row[name] = r
        row["retro_mfu_over_baseline_mfu"] = row["retro"]["mfu"] / row["baseline"]["mfu"]
        row["retro_step_over_baseline_step"] = row["retro"]["step_s"] / row["baseline"]["step_s"]
        results["models"][preset] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
