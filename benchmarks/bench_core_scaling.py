"""How well pieces of the train step use a CPU's cores: each timed on all cores and on one.

Issue #19's reproduction of why RETRO's step keeps fewer cores busy than its baseline's on a
2-core CPU (benchmarks/results/model.md): the forward and backward pass of each piece, at the
`small` RETRO-pytorch shapes (`bench_model_step.PEER_SHAPES`: batch 2 x 512 tokens, k = 2
neighbours of 128 tokens, d 256, 8 heads of 64), is jitted and timed in a child process that
may use every CPU of this one and in another pinned to one CPU (`os.sched_setaffinity` before
JAX starts, so XLA:CPU sizes its thread pools for one). Per piece: median time on each, the
speedup (one CPU's time over all CPUs'), and the cores kept busy (process CPU time over wall
time, from `resource.getrusage`; spinning threads count as busy).

    python benchmarks/bench_core_scaling.py [--repeats 15] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The pieces, each a (parameters, inputs) -> loss whose gradient is timed; see `pieces`.
NAMES = (
    "encoder",
    "decoder 3 layers",
    "encoder self-attention",
    "decoder self-attention",
    "encoder cross-attention",
    "encoder FFW",
    "batched scores product",
)


def pieces(quick: bool) -> dict:
    """{name: (jitted gradient, its arguments)} at the peer `small` shapes (or at small sizes
    with `quick`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from retro_jax.model import RetroConfig
    from retro_jax.model.attention import cross_attention, self_attention
    from retro_jax.model.create import create_model
    from retro_jax.model.encoder import NeighbourEncoder, attention_params, values
    from retro_jax.model.layers import feed_forward, layer_params
    from retro_jax.model.retro import decoder_layer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model_step import PEER_SHAPES

    c = RetroConfig.from_dict(PEER_SHAPES["small"])
    batch, seq, k = 2, 512, 2
    if quick:
        c = c.replace(
            d_model=64, d_ff=128, enc_d_model=64, enc_d_ff=128, num_heads=2, enc_num_heads=2,
            head_dim=16, enc_head_dim=16, chunk_size=16, vocab_size=512,
        )  # fmt: skip
        batch, seq = 1, 64
    m, r = c.chunk_size, 2 * c.chunk_size
    chunks, de, heads, hd = seq // m, c.enc_d_model, c.enc_num_heads, c.enc_head_dim
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) / 16)

    def grad_of(loss, argnums=(0, 1)):
        return jax.jit(jax.grad(loss, argnums=argnums))

    out = {}
    encoder = NeighbourEncoder(c, rngs=nnx.Rngs(0))
    graph, enc_params = nnx.split(encoder, nnx.Param)
    neighbours = jnp.asarray(rng.integers(1, c.vocab_size, (batch, chunks, k, r)).astype(np.int32))
    chunk_h = normal(batch, chunks, m, c.d_model)
    chunk_mask = jnp.ones((batch, chunks, m), bool)

    def encoder_loss(p, h):
        return jnp.sum(nnx.merge(graph, p)(neighbours, h, chunk_mask) ** 2)

    out["encoder"] = (grad_of(encoder_loss), (enc_params, chunk_h))

    layer = layer_params(values(create_model(c.baseline()).decoder), 0)
    x = normal(batch, seq, c.d_model)
    positions, token_mask = np.arange(seq), jnp.ones((batch, seq), bool)

    def decoder_loss(p, h):
        for _ in range(3):
            h = decoder_layer(p, h, positions, token_mask, c)
        return jnp.sum(h**2)

    out["decoder 3 layers"] = (grad_of(decoder_loss), (layer, x))

    def attention(d_kv):  # one attention layer's q/k/v/o, keys and values from width d_kv
        return values(attention_params(nnx.Rngs(1), (), de, d_kv, heads, hd, "kv"))

    tokens = normal(batch, chunks, k, r, de)  # the encoder's activations
    enc_mask, enc_positions = jnp.ones(tokens.shape[:-1], bool), np.arange(r)

    def enc_self(p, h):
        return jnp.sum(
            self_attention(p, h, enc_positions, enc_mask, causal=False, rope_base=1e4) ** 2
        )

    out["encoder self-attention"] = (grad_of(enc_self), (attention(de), tokens))

    def dec_self(p, h):
        y = self_attention(p, h, positions, token_mask, causal=True, rope_base=1e4)
        return jnp.sum(y**2)

    out["decoder self-attention"] = (grad_of(dec_self), (layer["attn"], x))
    context = normal(batch, chunks, 1, m, c.d_model)  # C_u, broadcast over the neighbours
    context_mask = jnp.ones(context.shape[:-1], bool)

    def enc_cross(p, h, ctx):
        y = cross_attention(p, h, ctx, enc_positions, np.arange(m), context_mask, rope_base=1e4)
        return jnp.sum(y**2)

    args = (attention(c.d_model), tokens, context)
    out["encoder cross-attention"] = (grad_of(enc_cross, (0, 1, 2)), args)

    def enc_ffw(w, h):
        return jnp.sum(feed_forward(h, w[0], w[1], c.activation) ** 2)

    ffw = (normal(de, c.enc_d_ff), normal(c.enc_d_ff, de))
    out["encoder FFW"] = (grad_of(enc_ffw), (ffw, tokens))
    # The encoder's attention scores alone, one [r, hd] x [hd, r] product per neighbour and head.
    q = normal(batch * chunks * k * heads, r, hd)
    kt = normal(batch * chunks * k * heads, hd, r)
    out["batched scores product"] = (
        grad_of(lambda a, b: jnp.sum(jnp.tanh(a @ b))),
        (q, kt),
    )
    return out


def time_pieces(quick: bool, repeats: int) -> dict:
    """{name: {median_s, cores_busy}} in this process."""
    import jax

    from retro_jax.host_memory import keep_freed_memory

    keep_freed_memory()
    result = {}
    for name, (fn, args) in pieces(quick).items():
        for _ in range(2):  # compile, then one warm step
            jax.block_until_ready(fn(*args))
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result[name] = {"median_s": statistics.median(times), "cores_busy": cpu / sum(times)}
    return result


def run_child(cpus: set[int] | None, quick: bool, repeats: int) -> dict:
    """time_pieces in a fresh process, pinned to `cpus` (None: this process's CPUs)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--repeats", str(repeats)]
    cmd += ["--quick"] if quick else []
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pin)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"bench_core_scaling: the child on CPUs {cpus or 'all'} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per piece")
    parser.add_argument("--quick", action="store_true", help="small shapes (the tests)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_pieces(args.quick, args.repeats)))
        return
    allowed = sorted(os.sched_getaffinity(0))
    every = run_child(None, args.quick, args.repeats)
    one = run_child({allowed[0]}, args.quick, args.repeats)
    rows = {
        name: {
            "all_cpus_s": every[name]["median_s"],
            "one_cpu_s": one[name]["median_s"],
            "speedup": one[name]["median_s"] / every[name]["median_s"],
            "cores_busy": every[name]["cores_busy"],
            "one_cpu_cores_busy": one[name]["cores_busy"],  # about 1: the pinning held
        }
        for name in NAMES
    }
    print(
        json.dumps(
            dict(
                benchmark="core_scaling",
                cpus=len(allowed),
                shapes="quick" if args.quick else "RETRO-pytorch's small",
                repeats=args.repeats,
                pieces=rows,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
