"""The figures of `retro-jax eval` (W/eval/*.png), each from metrics.json's values alone.

    leakage.png     bpb(alpha) of RETRO, RETRO[OFF] and the baseline (the paper's figure 6)
    neighbours.png  RETRO's bpb against k (eval.neighbour_sweep)
    database.png    RETRO's bpb against the database size (eval.database_fractions)

Written as PNG through a temporary name (local or remote W, through retro_jax.data.files).
"""

from __future__ import annotations

from retro_jax.data import files

LEAKAGE_MODES = ("retrieval", "no_retrieval", "baseline")
LABELS = {"retrieval": "RETRO", "no_retrieval": "RETRO[OFF]", "baseline": "baseline"}


def _save_figure(fig, path: str) -> None:
    """A PNG through a temporary name: straight to disk locally; for a remote path, into a
    buffer that is then written whole."""
    with files.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def plot_leakage(metrics: dict, path: str) -> None:
    """bpb(alpha) for RETRO, RETRO[OFF] and the baseline (the paper's figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["leakage"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in zip(LEAKAGE_MODES, ("o-", "s--", "^:")):
        values = [r[f"{mode}_bpb"] for r in rows]
        if any(v is not None for v in values):
            xs = [100 * r["alpha"] for r, v in zip(rows, values) if v is not None]
            ys = [v for v in values if v is not None]
            ax.plot(xs, ys, style, label=LABELS[mode])
    ax.set_xlabel("max eval/retrieved chunk overlap r(C) (%)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"Leakage (r(C) over the {metrics['leakage_neighbours']} neighbours RETRO reads)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)


def plot_neighbours(metrics: dict, path: str) -> None:
    """bpb against the number of neighbours, with RETRO[OFF] and the baseline as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["neighbour_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["num_neighbours"] for r in rows], [r["bpb"] for r in rows], "o-", label="RETRO")
    for mode, style in (("no_retrieval", "--"), ("baseline", ":")):
        if metrics.get(mode) and metrics[mode]["bpb"] is not None:
            ax.axhline(metrics[mode]["bpb"], linestyle=style, color="grey", label=LABELS[mode])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([r["num_neighbours"] for r in rows], [str(r["num_neighbours"]) for r in rows])
    ax.set_xlabel("neighbours per chunk (k)")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)


def plot_database(metrics: dict, path: str) -> None:
    """RETRO's bpb against the database size in chunks (log axis), with RETRO[OFF] and the
    baseline as lines (the paper's figure 1, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["database_sweep"]
    k = metrics["retrieval"]["num_neighbours"]
    chunks = [r["chunks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(chunks, [r["bpb"] for r in rows], "o-", label=f"RETRO (k={k})")
    for mode, style in (("no_retrieval", "--"), ("baseline", ":")):
        if metrics.get(mode) and metrics[mode]["bpb"] is not None:
            ax.axhline(metrics[mode]["bpb"], linestyle=style, color="grey", label=LABELS[mode])
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(chunks, [f"{c:,}\n({r['fraction']:.4g})" for c, r in zip(chunks, rows)])
    ax.set_xlabel("database chunks (fraction of the database)")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)
