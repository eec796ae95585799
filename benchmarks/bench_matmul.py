"""The matrix products of the 172m train step, XLA:CPU against PyTorch, one after the other.

Issue #19's minimal reproduction: if retro_jax's CPU step is slower than RETRO-pytorch's at the
same shapes, how much of it is the products themselves? Each product of one decoder layer and of
the vocabulary head, forward and both gradients, with its operands laid out as a model's forward
and backward pass hands them over (a weight gradient contracts the token axis of two [tokens, ...]
activations; an input gradient multiplies by the transposed weight), is timed alone:

    JAX:     jax.jit(lax.dot_general) on the operands as they lie (XLA picks kernel and copies)
    PyTorch: torch.matmul on views (a transposed operand is a strided view; BLAS takes it as is)

Rounds alternate between the two (`--torch-python` names an interpreter that has torch, e.g.
RETRO-pytorch's venv; this one needs none), and each product's best time over all rounds is kept:
a slow round (other tenants, a noisy neighbour) cannot make either side look faster. The JSON has
GFLOP/s per product for each and, weighted by how often the step runs each product, the time the
step's products would take on either side.

    python benchmarks/bench_matmul.py --torch-python /tmp/peer/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# RETRO-pytorch's 172m shapes (shared/anchors): batch 2 x 512 tokens, d 896, FFW 3584, 8 heads
# of 64 (what its decoder builds: bench_model_step.PEER_SHAPES), vocabulary 32,000, 12 layers.
# `--shapes demo`: `retro-jax demo`'s model (batch 8 x 256, d 128, 4 layers, vocabulary 4,096)
# and its neighbour encoder (d 64 over k = 2 neighbours of 64 tokens per 32-token chunk: 4x the
# decoder's tokens).
SHAPES = {
    "172m": dict(seq=512, d=896, ff=3584, vocab=32000, head_dim=64, batch=2, heads=8, layers=12),
    "demo": dict(seq=256, d=128, ff=512, vocab=4096, head_dim=32, batch=8, heads=4, layers=4),
}
DEMO_ENCODER = dict(d=64, ff=256, tokens_per_token=4, layers=2)


def products(scale: int = 1, shapes: str = "172m") -> list[dict]:
    """[{name, a, b, contract: (axis of a, axis of b), batch: bool, per_step}], shapes as laid out
    (every size divided by `scale`: the tests' small version).

    `contract` names the contracted axis of each operand: (1, 0) is a @ b, (1, 1) is a @ b.T,
    (0, 0) is a.T @ b. Batched products carry a leading batch axis on both operands. A weight
    gradient comes twice: as the backward pass hands it over, and (`written`, per_step 0) with
    a.T written out first, as `layers.dense_wide` takes the vocabulary head's (a product alone
    can gain where a whole step does not: benchmarks/results/model.md)."""
    size = SHAPES[shapes]
    seq, d, ff, vocab, head_dim = (
        size[n] // scale for n in ("seq", "d", "ff", "vocab", "head_dim")
    )
    batch, heads, layers = size["batch"], size["heads"], size["layers"]
    tokens = batch * seq
    out = []

    def weight(name, k, n, per_step, rows=tokens):  # y[T, n] = x[T, k] @ w[k, n], its gradients
        out.append(dict(name=f"{name} forward", a=(rows, k), b=(k, n), contract=(1, 0)))
        out.append(dict(name=f"{name} grad x", a=(rows, n), b=(k, n), contract=(1, 1)))
        out.append(dict(name=f"{name} grad w", a=(rows, k), b=(rows, n), contract=(0, 0)))
        for p in out[-3:]:
            p.update(batch=False, per_step=per_step)
        out.append(dict(out[-1], name=f"{name} grad w, x^T written", written=True, per_step=0))

    inner = heads * head_dim  # the attention's width (RETRO-pytorch's 172m: 512, not d)
    weight("qkv", d, 3 * inner, layers)
    weight("attn out", inner, d, layers)
    weight("ffw in", d, ff, layers)
    weight("ffw out", ff, d, layers)
    weight("head", d, vocab, 1)
    if shapes == "demo":
        enc = {n: v // scale for n, v in DEMO_ENCODER.items() if n in ("d", "ff")}
        rows, enc_layers = tokens * DEMO_ENCODER["tokens_per_token"], DEMO_ENCODER["layers"]
        weight("encoder qkv", enc["d"], 3 * enc["d"], enc_layers, rows)
        weight("encoder ffw in", enc["d"], enc["ff"], enc_layers, rows)
        weight("encoder ffw out", enc["ff"], enc["d"], enc_layers, rows)
    bh = batch * heads  # scores q k^T [bh, n, n] and values p v [bh, n, dh], and the gradients
    attention = [
        ("scores forward", (bh, seq, head_dim), (bh, seq, head_dim), (2, 2)),
        ("values forward", (bh, seq, seq), (bh, seq, head_dim), (2, 1)),
        ("scores grad q", (bh, seq, seq), (bh, seq, head_dim), (2, 1)),
        ("values grad p", (bh, seq, head_dim), (bh, seq, head_dim), (2, 2)),
        ("scores grad k", (bh, seq, seq), (bh, seq, head_dim), (1, 1)),
        ("values grad v", (bh, seq, seq), (bh, seq, head_dim), (1, 1)),
    ]
    for name, a, b, contract in attention:
        out.append(dict(name=name, a=a, b=b, contract=contract, batch=True, per_step=layers))
    return out


def flops(p: dict) -> float:
    a, b, (ca, cb) = p["a"], p["b"], p["contract"]
    k = a[ca]
    size = 1
    for i, n in enumerate(a):
        size *= n if i != ca else 1
    for i, n in enumerate(b):
        size *= n if (i != cb and not (p["batch"] and i == 0)) else 1
    return 2.0 * size * k


def matmul_operands(a, b, contract: tuple[int, int], swap):
    """(left, right) with left @ right the product `contract` names: the contracted axis moved
    last in a and second to last in b by `swap` (a view that swaps the last two axes)."""
    last = len(a.shape) - 1
    return (a if contract[0] == last else swap(a)), (b if contract[1] == last - 1 else swap(b))


def time_jax(plist: list[dict], repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    from retro_jax.model.layers import written_transpose

    best = []
    for p in plist:
        batch = ((0,), (0,)) if p["batch"] else ((), ())
        dims = (((p["contract"][0],), (p["contract"][1],)), batch)
        f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        if p.get("written"):  # a.T written out as the model's head does, then a plain product
            f = jax.jit(lambda a, b: jnp.dot(written_transpose(a), b))
        a = jnp.full(p["a"], 0.01, jnp.float32)
        b = jnp.full(p["b"], 0.02, jnp.float32)
        f(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return best


def time_torch(plist: list[dict], repeats: int) -> list[float]:
    import torch

    best = []
    with torch.no_grad():
        for p in plist:
            a = torch.full(p["a"], 0.01)
            b = torch.full(p["b"], 0.02)
            left, right = matmul_operands(a, b, p["contract"], lambda x: x.transpose(-1, -2))
            torch.matmul(left, right)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                torch.matmul(left, right)
                times.append(time.perf_counter() - start)
            best.append(min(times))
    return best


def one_round(framework: str, repeats: int, scale: int = 1, shapes: str = "172m") -> list[float]:
    plist = products(scale, shapes)
    return (time_jax if framework == "jax" else time_torch)(plist, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("RETRO_JAX_TORCH_PYTHON", ""),
        help="an interpreter with torch to compare with (default: $RETRO_JAX_TORCH_PYTHON)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per product a round")
    parser.add_argument("--scale", type=int, default=1, help="divide every size by this")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="172m", help="whose products")
    parser.add_argument("--round-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_python and not shutil.which(args.torch_python):
        sys.exit(f"bench_matmul: --torch-python {args.torch_python}: no such interpreter")
    if args.round_only:  # a child: one round of one side, times on stdout
        print(json.dumps(one_round(args.framework, args.repeats, args.scale, args.shapes)))
        return
    plist = products(args.scale, args.shapes)
    sides = ["jax"] + (["torch"] if args.torch_python else [])
    python = {"jax": sys.executable, "torch": args.torch_python}
    best: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for side in sides:  # a fresh process per round: neither side warms the other's caches
            cmd = [python[side], os.path.abspath(__file__), "--round-only"]
            cmd += ["--framework", side, "--repeats", str(args.repeats), "--scale", str(args.scale)]
            cmd += ["--shapes", args.shapes]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                sys.exit(f"bench_matmul: the {side} round ({python[side]}) failed: {last}")
            times = json.loads(out.stdout.strip().splitlines()[-1])
            best[side] = [min(x, y) for x, y in zip(best.get(side, times), times)]
    rows = []
    for i, p in enumerate(plist):
        row = dict(name=p["name"], a=list(p["a"]), b=list(p["b"]), per_step=p["per_step"])
        for side in sides:
            gflops = flops(p) / best[side][i] / 1e9
            row[f"{side}_gflops"] = float(f"{gflops:.3g}")  # 3 figures: a tiny one is not 0.0
        if "torch" in best:
            row["jax_over_torch"] = round(best["torch"][i] / best["jax"][i], 3)
        rows.append(row)
    summary = {
        f"{side}_step_products_s": round(
            sum(p["per_step"] * t for p, t in zip(plist, best[side])), 3
        )
        for side in sides
    }
    summary["step_products_gflop"] = round(sum(p["per_step"] * flops(p) for p in plist) / 1e9, 1)
    print(
        json.dumps(
            dict(
                products=rows, **summary, rounds=args.rounds, scale=args.scale, shapes=args.shapes
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
