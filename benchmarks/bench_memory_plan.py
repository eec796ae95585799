"""Check memory_plan's activation estimate against XLA: compile (never run) the gradient of a
model's loss for one device and compare XLA's temporary-buffer size with `activation_bytes`.

  python benchmarks/bench_memory_plan.py --preset 172m --seq 2048 --batch 1 --neighbours 2 \
      --dtype float32 --remat 1 [--cca_layers 6,9,12] [--logits_chunk 512]

Prints one JSON object. Compilation only allocates nothing, so paper-sized shapes work on a
laptop (a minute on 2 cores for the 172M preset). On CPU, prefer --dtype float32: the CPU
backend computes bfloat16 in float32.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from retro_jax.model.config import RetroConfig
from retro_jax.model.create import lower_loss_grad
from retro_jax.model.memory import ACTIVATION_OVERHEAD, GIB, activation_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="172m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", type=int, default=1)
    parser.add_argument("--cca_layers", default=None, help="comma-separated, 1-based")
    parser.add_argument("--logits_chunk", type=int, default=0, help="model.logits_chunk")
    args = parser.parse_args()

    config = RetroConfig.preset(args.preset).replace(
        dtype=args.dtype, scan_layers=True, remat=bool(args.remat), logits_chunk=args.logits_chunk
    )
    if args.cca_layers is not None:
        config = config.replace(cca_layers=tuple(int(i) for i in args.cca_layers.split(",") if i))
    retrieve = bool(args.neighbours and config.cca_layers)
    start = time.perf_counter()
    lowered = lower_loss_grad(
        config, batch=args.batch, seq_len=args.seq, neighbours=args.neighbours if retrieve else 0
    )
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    estimate = activation_bytes(
        config,
        batch=args.batch,
        seq_len=args.seq,
        neighbours=args.neighbours if retrieve else 0,
        tensor=1,
    )
    raw = sum(estimate.values())
    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "preset": args.preset,
                "cca_layers": list(config.cca_layers),
                "dtype": args.dtype,
                "remat": bool(args.remat),
                "logits_chunk": args.logits_chunk,
                "batch": args.batch,
                "seq": args.seq,
                "neighbours": args.neighbours if retrieve else 0,
                "compile_s": round(seconds, 1),
                "xla_temp_gib": round(analysis.temp_size_in_bytes / GIB, 3),
                "xla_arguments_gib": round(analysis.argument_size_in_bytes / GIB, 3),
                "estimate_gib": round(raw / GIB, 3),
                "estimate_with_overhead_gib": round(raw * (1 + ACTIVATION_OVERHEAD) / GIB, 3),
                "xla_over_estimate": round(analysis.temp_size_in_bytes / raw, 3),
                "breakdown_gib": {k: round(v / GIB, 3) for k, v in estimate.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
