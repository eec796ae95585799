"""The train step of RETRO vs its baseline twin: tokens/s, FLOP/s and MFU; sharded == single.

    python benchmarks/bench_model_step.py [--presets tiny,172m] [--seq-len 256] [--steps 5]
    # on a GPU (no TensorFlow needed): the 172m and 425m presets at the paper's length
    python benchmarks/bench_model_step.py --presets 172m,425m --seq-len 2048 --batch 8 \
        --dtype bfloat16 --peak-size 8192 --check
    # the shapes at which RETRO-pytorch is measured side by side (benchmarks/results/model.md)
    python benchmarks/bench_model_step.py --peer-shapes --presets small,172m
    # RETRO's MFU over its baseline's as the vocabulary's head shrinks (results/model.md)
    python benchmarks/bench_model_step.py --peer-shapes --presets small --vocab-sizes 32000,1000

What is timed is the training step itself (`retro_jax.train.step.make_train_step`: forward,
backward, global-norm clipping and AdamW, with the train state donated), on synthetic batches,
over all local devices of an accelerator (one CPU device on a CPU). MFU is the analytic model
FLOPs (`retro_jax.model.info.flops_per_token`, PaLM convention) per second over

- `mfu`: the FLOP/s of a large matmul in the compute dtype measured in the same run, so ratios
  between models are what to compare on any machine;
- `mfu_spec`: the chip's dense peak from its data sheet (`PEAK_FLOPS`), for known accelerators.

The baseline's and RETRO's steps are timed interleaved, one of each per round, after both are
compiled: their ratio (`retro_mfu_over_baseline_mfu`, also round by round) is then measured
under the same conditions, on a machine whose speed drifts from minute to minute.

`--check` also trains the tiny preset in float32 for a few steps twice, on one device of the
default backend and on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices, and compares loss,
gradient norm and the parameter updates (matmuls at full precision): on a GPU that is the GPU's
result against a sharded one. Prints one JSON object. benchmarks/gpu_check.sh runs the GPU
measurement of the paper presets.
"""

from __future__ import annotations

import os
import sys

# Eight host devices for the sharded half of --check, set before jax is imported (added to any
# XLA_FLAGS the machine sets). Only then: on a CPU they slow the timed step (which runs on one of
# them) by 10-25%.
_flags = os.environ.get("XLA_FLAGS", "")
if "--check" in sys.argv and "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from retro_jax.host_memory import keep_freed_memory  # noqa: E402
from retro_jax.model import RetroConfig  # noqa: E402
from retro_jax.model.create import create_model  # noqa: E402
from retro_jax.model.info import flops_per_token, head_flops_per_token  # noqa: E402
from retro_jax.sharding import make_mesh, shard_batch  # noqa: E402
from retro_jax.train.metrics import PEAK_FLOPS, measure_matmul_flops  # noqa: E402
from retro_jax.train.state import init_state  # noqa: E402
from retro_jax.train.step import batch_shardings, make_optimizer, make_train_step  # noqa: E402

# lucidrains/RETRO-pytorch's model as its side-by-side harness builds it: the 172m preset (the
# paper's 172M decoder widths, CCA at 6, 9, 12) with a 32k vocabulary, and every attention with
# 8 heads of 64. The harness asks for 16 heads (4 at `small`), but RETRO-pytorch's RETRO does
# not pass `heads` on to its decoder or encoder, which keep their default of 8 (its to_q is
# [512, 896] at 172m): 512-wide attention at both shapes (benchmarks/results/model.md). Its
# encoder's two layers both attend to the chunk; `small` narrows it to d 256, 6 layers, CCA at
# 3 and 6.
_PEER_172M = RetroConfig.preset("172m").replace(
    vocab_size=32_000, num_heads=8, enc_num_heads=8, enc_cross_layers=(1, 2)
)
PEER_SHAPES = {
    "small": _PEER_172M.replace(
        d_model=256, num_layers=6, d_ff=1024, cca_layers=(3, 6), enc_d_model=256, enc_d_ff=1024,
    ).to_dict(),
    "172m": _PEER_172M.to_dict(),
}  # fmt: skip

# The paper's optimizer (AdamW, clipping at 1); the schedule does not change the step's cost.
HYPER = SimpleNamespace(
    learning_rate=2e-4, warmup_from=1e-7, warmup_steps=750, steps=100_000, min_lr_ratio=0.1,
    weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
)  # fmt: skip
# The check takes real steps (no warmup) so that parameters move measurably.
CHECK_HYPER = SimpleNamespace(**{**vars(HYPER), "learning_rate": 3e-3, "warmup_steps": 0})


def synthetic_batch(config: RetroConfig, batch: int, seq_len: int, k: int, seed: int = 0):
    """Random tokens [batch, seq_len] (+ targets, mask) and neighbours [batch, l, k, 2m]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    out = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }
    if config.cca_layers:
        m = config.chunk_size
        shape = (batch, seq_len // m, k, 2 * m)
        out["neighbours"] = rng.integers(1, config.vocab_size, shape).astype(np.int32)
    return out


def train_steps(config: RetroConfig, mesh, batch: dict, hyper=HYPER):
    """(jitted train step, fresh sharded state, batch placed on the mesh)."""
    tx, schedule = make_optimizer(hyper)
    model = create_model(config, mesh=mesh)
    model_def, state, shardings = init_state(model, tx, mesh=mesh)
    del model
    with jax.set_mesh(mesh):
        placed = shard_batch(batch, mesh)
        step = make_train_step(
            model_def,
            tx,
            schedule,
            retrieval=bool(config.cca_layers),
            state_shardings=shardings,
            batch_shardings=batch_shardings(placed, mesh),
        )
    return step, state, placed


def time_steps(configs: dict, mesh, batch: int, seq_len: int, k: int, steps: int) -> dict:
    """{name: timing} for each of `configs` ({name: RetroConfig}), their steps interleaved.

    Every model is compiled and takes one step; then each round takes one step of each, in
    turn, so that a machine that slows down for a minute (other tenants, a noisy neighbour)
    slows every model's steps alike and their ratio holds: timed one after the other, RETRO's
    step over its baseline's moved by 15% between runs minutes apart on a 2-core VM
    (benchmarks/results/model.md). The first round is not timed (the baseline's first step
    after RETRO's compile took 1.7x its others at 172m). Each model's step_s is its median, and
    its step_times_s are in round order, so that steps of the same round can be compared."""
    runs = {}
    for name, config in configs.items():
        step, state, placed = train_steps(config, mesh, synthetic_batch(config, batch, seq_len, k))
        with jax.set_mesh(mesh):
            t = time.perf_counter()
            state, _ = jax.block_until_ready(step(state, placed))
            runs[name] = dict(
                step=step, state=state, placed=placed, compile_s=time.perf_counter() - t
            )
        runs[name]["times"] = []
    with jax.set_mesh(mesh):
        for timed in [False] + [True] * steps:  # a first round untimed: memory warmed again
            for run in runs.values():
                t = time.perf_counter()
                run["state"], run["metrics"] = jax.block_until_ready(
                    run["step"](run["state"], run["placed"])
                )
                if timed:
                    run["times"].append(time.perf_counter() - t)
    out = {}
    for name, run in runs.items():
        config = configs[name]
        step_s = statistics.median(run["times"])
        flops = flops_per_token(config, seq_len, k if config.cca_layers else 0) * batch * seq_len
        out[name] = {
            "step_s": step_s,
            "step_times_s": run["times"],
            "compile_s": run["compile_s"],
            "tokens_per_s": batch * seq_len / step_s,
            "flops_per_token": flops / (batch * seq_len),
            "flop_per_s": flops / step_s,
            "loss": float(run["metrics"]["loss"]),
        }
    return out


def spec_peak(device: jax.Device, dtype: str) -> float | None:
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if device.device_kind.startswith(name) or name in device.device_kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def check_sharded(steps: int = 3) -> dict:
    """The tiny preset in float32: one device of the default backend vs 8 sharded CPU devices."""
    config = RetroConfig.preset("tiny")
    batch = synthetic_batch(config, 8, 4 * config.chunk_size, 2, seed=1)
    cpus = jax.devices("cpu")
    if len(cpus) < 8:
        return {"skipped": f"{len(cpus)} CPU devices (XLA_FLAGS was set elsewhere)"}
    meshes = {
        "single": make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]),
        "sharded": make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=cpus[:8]),
    }
    runs = {}
    with jax.default_matmul_precision("highest"):
        for name, mesh in meshes.items():
            step, state, placed = train_steps(config, mesh, batch, CHECK_HYPER)
            initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
            losses, norms = [], []
            with jax.set_mesh(mesh):
                for _ in range(steps):
                    state, metrics = step(state, placed)
                    losses.append(float(metrics["loss"]))
                    norms.append(float(metrics["grad_norm"]))
            moved = [np.asarray(x) - x0 for x, x0 in zip(jax.tree.leaves(state.params), initial)]
            runs[name] = (losses, norms, moved, str(mesh.devices.flat[0].platform))
    (l1, n1, p1, where1), (l8, n8, p8, where8) = runs["single"], runs["sharded"]
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(l1, l8))
    norm_diff = max(abs(a - b) / abs(a) for a, b in zip(n1, n8))
    # How far apart the two runs' parameter updates are, relative to the updates themselves (a
    # global norm: Adam turns rounding in near-zero gradients into full-size steps of a few
    # weights, which a maximum would report; a sharding error moves all of them).
    update_diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(p1, p8)))
    update_diff /= np.sqrt(sum(float(np.sum(a**2)) for a in p1))
    return {
        "single": f"1 {where1} device",
        "sharded": f"(2, 2, 2) mesh of 8 {where8} devices",
        "steps": steps,
        "losses_single": l1,
        "losses_sharded": l8,
        "max_rel_loss_diff": loss_diff,
        "max_rel_grad_norm_diff": norm_diff,
        "rel_update_diff": float(update_diff),
        "equal": bool(loss_diff < 1e-4 and norm_diff < 1e-3 and update_diff < 1e-3),
    }


def compare(retro: RetroConfig, mesh, batch: int, args, peak: float, spec: float | None) -> dict:
    """RETRO and its baseline twin timed interleaved (`peak`, `spec`: FLOP/s of all devices of
    `mesh`, measured and from the data sheet): each one's figures, and their MFU ratio
    (over all rounds and round by round) beside the share of the baseline's FLOPs that is the
    vocabulary's head (`head_share_of_baseline_flops`), which RETRO shares but does not add to."""
    row = {"batch": batch, "vocab_size": retro.vocab_size}
    timed = time_steps(
        {"baseline": retro.baseline(), "retro": retro},
        mesh, batch, args.seq_len, args.neighbours, args.steps,
    )  # fmt: skip
    for name, r in timed.items():
        r["mfu"] = r["flop_per_s"] / peak
        r["mfu_spec"] = r["flop_per_s"] / spec if spec else None
        row[name] = r
    head = head_flops_per_token(retro)
    row["head_share_of_baseline_flops"] = head / row["baseline"]["flops_per_token"]
    row["retro_mfu_over_baseline_mfu"] = row["retro"]["mfu"] / row["baseline"]["mfu"]
    row["retro_step_over_baseline_step"] = row["retro"]["step_s"] / row["baseline"]["step_s"]
    # The same ratio step by step: RETRO's step over the baseline's of the same round.
    flop_ratio = row["retro"]["flops_per_token"] / row["baseline"]["flops_per_token"]
    per_round = [
        flop_ratio * b / r
        for r, b in zip(row["retro"]["step_times_s"], row["baseline"]["step_times_s"])
    ]
    row["retro_mfu_over_baseline_mfu_by_round"] = {
        "median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)
    }  # fmt: skip
    return row


def vocab_sizes(text: str) -> list[int]:
    """--vocab-sizes: a comma list of positive integers."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers (32000,1000), got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,172m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=0, help="0: 8 for tiny, 2 otherwise")
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    parser.add_argument("--peak-size", type=int, default=2048, help="8192 on a GPU/TPU")
    parser.add_argument("--check", action="store_true", help="also sharded == single device")
    parser.add_argument(
        "--peer-shapes",
        action="store_true",
        help="RETRO-pytorch's shapes (presets small, 172m; sequence 512, batch 2, vocab 32k)",
    )
    parser.add_argument(
        "--vocab-sizes",
        type=vocab_sizes,
        default=[None],
        help="comma list: time each preset at each of these vocabularies instead of its own",
    )
    args = parser.parse_args()
    if args.peer_shapes:
        args.seq_len, args.batch = 512, args.batch or 2
    keep_freed_memory()  # as the retro-jax command does (retro_jax/host_memory.py)

    device = jax.devices()[0]
    on_cpu = jax.default_backend() == "cpu"
    # One CPU device (the others are fakes sharing its cores); every accelerator of the host.
    devices = jax.devices()[:1] if on_cpu else jax.local_devices()
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=devices)
    with jax.default_device(devices[0]):
        peak = measure_matmul_flops(args.peak_size, 10, dtype=args.dtype)
    spec = spec_peak(device, args.dtype)
    results = {
        "benchmark": "model_step",
        "device": str(device.device_kind),
        "backend": jax.default_backend(),
        "devices": len(devices),
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "matmul_peak_flop_per_s": peak,
        "spec_peak_flop_per_s": spec,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "neighbours": args.neighbours,
        "shapes": "RETRO-pytorch's" if args.peer_shapes else "presets",
        "step": "train step (forward, backward, clipping, AdamW)",
        "models": {},
    }
    n = len(devices)  # the peaks of all devices the step runs on
    for preset in args.presets.split(","):
        shape = PEER_SHAPES[preset] if args.peer_shapes else RetroConfig.preset(preset).to_dict()
        retro = RetroConfig(**{**shape, "dtype": args.dtype})
        batch = args.batch or (8 if preset == "tiny" else 2)
        for vocab in args.vocab_sizes:
            config = retro.replace(vocab_size=vocab) if vocab else retro
            name = f"{preset}, vocabulary {vocab:,}" if vocab else preset
            results["models"][name] = compare(
                config, mesh, batch, args, peak * n, spec and spec * n
            )
    if args.check:
        results["sharded_check"] = check_sharded()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
