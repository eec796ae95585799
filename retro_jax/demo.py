"""`retro-jax demo`: prepare, train a baseline and RETRO, retro-fit, evaluate, sample; one table.

Layout of the demo's workdir W:
    W/prepare/     the shared offline pipeline (tokenizer, database, keys, index, shards)
    W/baseline/    the baseline twin (same decoder, no retrieval)
    W/retro/       RETRO trained from scratch for the same steps
    W/retrofit/    the baseline retro-fitted: frozen decoder, trained encoder + CCA
    W/demo.json    every number of the final table, and the sample with what each of its chunks
                   retrieved
Each model folder links `prepare -> ../prepare`, so `retro-jax eval/sample --workdir W/retro`
work on it directly. Rerunning resumes: finished stages return at once.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

from retro_jax.errors import RetroError


def _model_workdir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    link = os.path.join(path, "prepare")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "prepare"), link)
    return path


def _variant(config, **sections):
    """A deep copy of `config` with nested overrides {"model": {"cca_layers": ()}, ...}."""
    out = copy.deepcopy(config)
    for section, values in sections.items():
        for key, value in values.items():
            out[section][key] = value
    return out


def format_retrieved(chunks: list[dict]) -> str:
    """`retro-jax sample --show-neighbours`'s view of the neighbours stored in demo.json."""
    from retro_jax.sample.live import RetrievedChunk, format_neighbours

    shown = format_neighbours([RetrievedChunk.from_json(c) for c in chunks])
    return shown or "(no chunk was completed: nothing retrieved)"


def run_demo(config, workdir: str, *, progress: bool = True) -> dict:
    """Run every stage; returns the summary written to W/demo.json."""
    from retro_jax.evaluate import evaluate, write_outputs
    from retro_jax.prepare.run import run_prepare
    from retro_jax.sample.sampler import Sampler
    from retro_jax.train.loop import train

    if not config.model.cca_layers:
        raise RetroError("demo: model.cca_layers is empty; the demo needs a RETRO model")
    os.makedirs(workdir, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args, **kwargs):
        print(f"\n=== demo: {stage} ===", flush=True)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[stage] = time.perf_counter() - start
        return out

    timed("prepare", run_prepare, config, workdir, progress=progress)

    baseline_dir = _model_workdir(workdir, "baseline")
    retro_dir = _model_workdir(workdir, "retro")
    retrofit_dir = _model_workdir(workdir, "retrofit")
    baseline_cfg = _variant(config, model={"cca_layers": ()})
    retrofit_cfg = _variant(
        config,
        train={
            "retrofit_from": baseline_dir,
            "steps": int(config.demo.retrofit_steps),
            "retrofit_sequences": 0,  # the demo's own length, not the paper's 6M sequences
            "warmup_steps": min(int(config.train.warmup_steps), int(config.demo.retrofit_steps)),
        },
    )
    timed("train baseline", train, baseline_cfg, baseline_dir)
    timed("train RETRO", train, config, retro_dir)
    timed("retro-fit", train, retrofit_cfg, retrofit_dir)

    eval_cfg = _variant(config, eval={"baseline_workdir": baseline_dir})
    retro_eval = timed("eval RETRO", evaluate, eval_cfg, retro_dir, progress=progress)
    # (the database-size sweep is RETRO's alone)
    retrofit_eval_cfg = _variant(config, eval={"database_fractions": ()})
    retrofit_eval = timed(
        "eval retro-fit", evaluate, retrofit_eval_cfg, retrofit_dir, progress=progress
    )
    for folder, metrics in ((retro_dir, retro_eval), (retrofit_dir, retrofit_eval)):
        write_outputs(metrics, os.path.join(folder, "eval"))

    sampler = Sampler.from_workdir(config, retro_dir)
    result = timed(
        "sample",
        sampler.generate,
        str(config.demo.prompt),
        max_new_tokens=int(config.demo.max_new_tokens),
        seed=int(config.demo.seed),
    )
    leakage = {row["alpha"]: row for row in retro_eval["leakage"]}
    eighth = leakage.get(0.125, {})
    summary = {
        "bpb": {
            "baseline": retro_eval["baseline"]["bpb"],
            "retro": retro_eval["retrieval"]["bpb"],
            "retro_off": retro_eval["no_retrieval"]["bpb"],
            "retrofit": retrofit_eval["retrieval"]["bpb"],
            "retrofit_off": retrofit_eval["no_retrieval"]["bpb"],
        },
        "bpb_alpha_1_8": {
            "chunks": eighth.get("chunks"),
            "baseline": eighth.get("baseline_bpb"),
            "retro": eighth.get("retrieval_bpb"),
            "retro_off": eighth.get("no_retrieval_bpb"),
        },
        "eval_tokens": retro_eval["retrieval"]["tokens"],
        "eval_bytes": retro_eval["retrieval"]["bytes"],
        "num_neighbours": retro_eval["retrieval"]["num_neighbours"],
        "leakage": retro_eval["leakage"],
        "leakage_plot": os.path.join(retro_dir, "eval", "leakage.png"),
        "database_sweep": retro_eval.get("database_sweep", []),
        "database_plot": os.path.join(retro_dir, "eval", "database.png"),
        "sample": {
            "prompt": result.prompt,
            "text": result.text,
            "neighbours": [chunk.to_json() for chunk in result.chunks],
        },
        "seconds": seconds,
    }
    with open(os.path.join(workdir, "demo.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(workdir, "demo.json.tmp"), os.path.join(workdir, "demo.json"))
    return summary


def format_summary(summary: dict) -> str:
    def num(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    def change(x, ref):
        bad = x is None or ref is None or ref == 0 or math.isnan(x) or math.isnan(ref)
        return "" if bad else f"{100 * (x - ref) / ref:+.1f}%"

    b, e = summary["bpb"], summary["bpb_alpha_1_8"]
    lines = [
        "",
        f"held-out bits-per-byte ({summary['eval_tokens']:,} tokens, {summary['eval_bytes']:,}"
        f" bytes, k={summary['num_neighbours']})",
        f"  {'model':<28}{'all chunks':>12}{'vs baseline':>12}{'alpha<=1/8':>12}",
        f"  {'baseline':<28}{num(b['baseline']):>12}{'':>12}{num(e['baseline']):>12}",
    ]
    for name, key in (("RETRO", "retro"), ("RETRO[OFF]", "retro_off")):
        vs = change(b[key], b["baseline"])
        lines.append(f"  {name:<28}{num(b[key]):>12}{vs:>12}{num(e[key]):>12}")
    for name, key in (
        ("retro-fitted baseline", "retrofit"),
        ("retro-fitted [OFF]", "retrofit_off"),
    ):
        lines.append(f"  {name:<28}{num(b[key]):>12}{change(b[key], b['baseline']):>12}")
    lines += [
        f"  (alpha<=1/8: the {e['chunks']} evaluation chunks sharing fewer than 1/8 of their"
        " tokens as one run with any neighbour)",
        f"leakage plot: {summary['leakage_plot']}",
    ]
    curve = summary.get("leakage", [])
    if curve:
        lines.append(
            "bpb over the chunks whose longest run shared with a neighbour is <= alpha * m:"
        )
        lines.append(f"  {'alpha':>7}{'chunks':>8}{'RETRO':>10}{'RETRO[OFF]':>12}{'baseline':>10}")
        lines += [
            f"  {r['alpha']:>7.3f}{r['chunks']:>8}{num(r.get('retrieval_bpb')):>10}"
            f"{num(r.get('no_retrieval_bpb')):>12}{num(r.get('baseline_bpb')):>10}"
            for r in curve
        ]
    sweep = summary.get("database_sweep", [])
    if sweep:
        lines.append("RETRO's bpb by the size of the database it retrieves from:")
        lines.append(f"  {'fraction':>9}{'chunks':>10}{'tokens':>12}{'bpb':>10}")
        lines += [
            f"  {r['fraction']:>9.3f}{r['chunks']:>10,}{r['tokens']:>12,}{num(r['bpb']):>10}"
            for r in sweep
        ]
        lines.append(f"database plot: {summary['database_plot']}")
    lines += [
        f"sample: {summary['sample']['prompt']!r} -> {summary['sample']['text']!r}",
        "retrieved neighbours of the sample (each chunk's neighbours condition the next chunk):",
        format_retrieved(summary["sample"].get("neighbours", [])),
        "",
        "wall time per stage:",
    ]
    lines += [f"  {stage:<28}{sec:>10.1f} s" for stage, sec in summary["seconds"].items()]
    lines.append(f"  {'total':<28}{sum(summary['seconds'].values()):>10.1f} s")
    return "\n".join(lines)


def main(config, workdir: str | None) -> dict:
    if not workdir:
        raise RetroError("demo: --workdir is required")
    summary = run_demo(config, workdir)
    print(format_summary(summary))
    return summary
