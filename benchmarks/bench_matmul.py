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

# RETRO-pytorch's 172m shapes (shared/anchors): batch 2 x 512 tokens, d 896, FFW 3584, 16 heads
# of 64, vocabulary 32,000, 12 decoder layers.
SIZES = dict(seq=512, d=896, ff=3584, vocab=32000, head_dim=64)
BATCH, HEADS, LAYERS = 2, 16, 12


def products(scale: int = 1) -> list[dict]:
    """[{name, a, b, contract: (axis of a, axis of b), batch: bool, per_step}], shapes as laid out
    (every size divided by `scale`: the tests' small version).

    `contract` names the contracted axis of each operand: (1, 0) is a @ b, (1, 1) is a @ b.T,
    (0, 0) is a.T @ b. Batched products carry a leading batch axis on both operands."""
    seq, d, ff, vocab, head_dim = (n // scale for n in SIZES.values())
    tokens = BATCH * seq
    out = []

    def weight(name, k, n, per_step):  # y[T, n] = x[T, k] @ w[k, n], and its two gradients
        out.append(dict(name=f"{name} forward", a=(tokens, k), b=(k, n), contract=(1, 0)))
        out.append(dict(name=f"{name} grad x", a=(tokens, n), b=(k, n), contract=(1, 1)))
        out.append(dict(name=f"{name} grad w", a=(tokens, k), b=(tokens, n), contract=(0, 0)))
        for p in out[-3:]:
            p.update(batch=False, per_step=per_step)

    weight("qkv", d, 3 * d, LAYERS)
    weight("attn out", d, d, LAYERS)
    weight("ffw in", d, ff, LAYERS)
    weight("ffw out", ff, d, LAYERS)
    weight("head", d, vocab, 1)
    bh = BATCH * HEADS  # scores q k^T [bh, n, n] and values p v [bh, n, dh], and the gradients
    attention = [
        ("scores forward", (bh, seq, head_dim), (bh, seq, head_dim), (2, 2)),
        ("values forward", (bh, seq, seq), (bh, seq, head_dim), (2, 1)),
        ("scores grad q", (bh, seq, seq), (bh, seq, head_dim), (2, 1)),
        ("values grad p", (bh, seq, head_dim), (bh, seq, head_dim), (2, 2)),
        ("scores grad k", (bh, seq, seq), (bh, seq, head_dim), (1, 1)),
        ("values grad v", (bh, seq, seq), (bh, seq, head_dim), (1, 1)),
    ]
    for name, a, b, contract in attention:
        out.append(dict(name=name, a=a, b=b, contract=contract, batch=True, per_step=LAYERS))
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

    best = []
    for p in plist:
        batch = ((0,), (0,)) if p["batch"] else ((), ())
        dims = (((p["contract"][0],), (p["contract"][1],)), batch)
        f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
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


def one_round(framework: str, repeats: int, scale: int = 1) -> list[float]:
    plist = products(scale)
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
    parser.add_argument("--round-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_python and not shutil.which(args.torch_python):
        sys.exit(f"bench_matmul: --torch-python {args.torch_python}: no such interpreter")
    if args.round_only:  # a child: one round of one side, times on stdout
        print(json.dumps(one_round(args.framework, args.repeats, args.scale)))
        return
    plist = products(args.scale)
    sides = ["jax"] + (["torch"] if args.torch_python else [])
    python = {"jax": sys.executable, "torch": args.torch_python}
    best: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for side in sides:  # a fresh process per round: neither side warms the other's caches
            cmd = [python[side], os.path.abspath(__file__), "--round-only"]
            cmd += ["--framework", side, "--repeats", str(args.repeats), "--scale", str(args.scale)]
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
            row[f"{side}_gflops"] = float(f"{flops(p) / best[side][i] / 1e9:.3g}")  # not 0.0 when tiny
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
        json.dumps(dict(products=rows, **summary, rounds=args.rounds, scale=args.scale), indent=1)
    )


if __name__ == "__main__":
    main()
