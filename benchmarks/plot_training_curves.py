"""Training curves of a demo run: loss against training tokens for every model of the workdir.

    python benchmarks/plot_training_curves.py DEMO_WORKDIR [--tokens-per-step 2048]
        [--out benchmarks/training_curves.png]

Reads DEMO_WORKDIR/{baseline,retro,retrofit}/train/metrics.jsonl (written by `retro-jax train`)
and DEMO_WORKDIR/demo.json, plots training loss against tokens seen, and prints the final
figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODELS = (("baseline", "baseline twin"), ("retro", "RETRO"), ("retrofit", "retro-fitted baseline"))


def read_curve(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument(
        "--tokens-per-step", type=int, default=8 * 256, help="train.batch_size x data.seq_len"
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "training_curves.png")
    )
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    final = {}
    for name, label in MODELS:
        path = os.path.join(args.workdir, name, "train", "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [r for r in read_curve(path) if "loss" in r]
        tokens = [r["step"] * args.tokens_per_step for r in rows]
        ax.plot(tokens, [r["loss"] for r in rows], label=label)
        final[name] = {"steps": rows[-1]["step"], "final_train_loss": rows[-1]["loss"]}
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("retro-jax demo: " + os.path.basename(os.path.normpath(args.workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    summary_path = os.path.join(args.workdir, "demo.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            final["demo"] = json.load(f)
    print(json.dumps({"plot": args.out, **final}, indent=2))


if __name__ == "__main__":
    main()
