"""`retro-jax eval --config CFG --workdir W`: bits per byte with and without retrieval, leakage.

One pass over the evaluation records of `W/prepare/` (windows of n tokens, stride n/2, each token
scored once) scores the same tokens several ways:
    retrieval      RETRO with the first k stored neighbours of every chunk (eval.num_neighbours)
    no_retrieval   RETRO with retrieval switched off (RETRO[OFF]: neighbours=None)
    baseline       the checkpoint in eval.baseline_workdir, if given
The RETRO checkpoint is W's, or eval.checkpoint_workdir's when set (one trained model scored
against the database and records another workdir prepared).
    k=j            RETRO with j neighbours, for j in eval.neighbour_sweep
    db=f           RETRO with k neighbours searched exactly in the first fraction f of the
                   database's documents, for f in eval.database_fractions
                   (retro_jax/eval_database.py)
Each record's chunks also get the leakage measure r(C) against the k neighbours RETRO reads
(retro_jax/leakage.py), so bpb(alpha) comes out of the same pass.

Writes W/eval/metrics.json, W/eval/leakage.png, with a sweep W/eval/neighbours.png, with database
fractions W/eval/database.png (W local or remote, gs://, through retro_jax.data.files), and prints
a table. Per-token losses come from one jitted function per model and k, on batches of the fixed
shape [eval.batch_size, n] (the last batch is padded with unscored rows); the database sweep's
neighbours are laid out like the records' [B, l, K, 2m], so it reuses RETRO's compilation.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec
from tqdm.auto import tqdm

from retro_jax.config import prepare_dir as prepare_dir_of
from retro_jax.data import files
from retro_jax.data.records import load_records_info
from retro_jax.errors import RetroError
from retro_jax.eval_database import DatabaseSweep, check_fractions
from retro_jax.eval_plots import LEAKAGE_MODES, plot_database, plot_leakage, plot_neighbours
from retro_jax.leakage import (
    ALPHAS,
    LeakageHistogram,
    bits_per_byte,
    chunk_overlap,
    curve_lines,
)
from retro_jax.model.load import find_checkpoints, load_model
from retro_jax.sharding import BATCH_AXES, check_batch_divides, make_mesh, shard_batch

_INPUTS = ("tokens", "targets", "neighbours")  # what the scorers read of a batch


def _token_nll(graphdef, state, tokens, targets, neighbours, k: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model.token_nll(tokens, None if k == 0 else neighbours[:, :, :k], targets)


# One jitted function for every scorer: the graph definition is static, so models of the same
# structure and batches of the same shape share compilations (across eval runs in one process).
_token_nll_jit = jax.jit(_token_nll, static_argnums=(0, 5))


class TokenScorer:
    """Per-token negative log-likelihood (nats) of one model, compiled per (batch shape, k)."""

    def __init__(self, model):
        self.config = model.config
        self._graphdef, self._state = nnx.split(model)

    def __call__(self, batch: dict, k: int) -> jax.Array:
        """batch: tokens, targets [B, n], neighbours [B, l, K, 2m] -> nll float32 [B, n]."""
        return _token_nll_jit(
            self._graphdef,
            self._state,
            batch["tokens"],
            batch["targets"],
            batch["neighbours"],
            k,
        )


def _host_local(x: jax.Array, mesh) -> np.ndarray:
    """This host's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(
        multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(BATCH_AXES))
    )


def _sum_over_hosts(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def summary(nll_nats: float, tokens: float, scored_bytes: float) -> dict:
    """{bpb, loss (nats per token), tokens, bytes} of summed losses."""
    return {
        "bpb": bits_per_byte(nll_nats, scored_bytes),
        "loss": nll_nats / tokens if tokens > 0 else None,
        "tokens": int(round(tokens)),
        "bytes": int(round(scored_bytes)),
    }


# ---------------------------------------------------------------- checks of what is loaded


def _check_model(model_cfg, info: dict, spec, where: str) -> None:
    if not model_cfg.is_baseline and model_cfg.chunk_size != spec.chunk_size:
        raise RetroError(
            f"{where}: model chunk_size={model_cfg.chunk_size} but the eval records were prepared "
            f"with chunk_size={spec.chunk_size}"
        )
    vocab = int(info.get("vocab_size", 0))
    if vocab > model_cfg.vocab_size:
        raise RetroError(
            f"{where}: model vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{vocab} (W/prepare/records.json)"
        )
    if int(info.get("pad_id", model_cfg.pad_id)) != model_cfg.pad_id:
        raise RetroError(
            f"{where}: model pad_id={model_cfg.pad_id} but the records pad with {info['pad_id']}"
        )


def _neighbour_counts(config, stored: int) -> tuple[int, list[int]]:
    """(eval.num_neighbours, sorted eval.neighbour_sweep), each checked against the records."""
    if stored < 1:
        raise RetroError("the eval records hold no neighbours (data.num_neighbours_stored=0)")
    k = int(config.eval.num_neighbours)
    if not 1 <= k <= stored:
        raise RetroError(
            f"eval.num_neighbours={k} must be between 1 and the {stored} neighbours the records "
            "store (data.num_neighbours_stored)"
        )
    sweep = sorted({int(j) for j in (config.eval.neighbour_sweep or ())})
    bad = [j for j in sweep if not 1 <= j <= stored]
    if bad:
        raise RetroError(
            f"eval.neighbour_sweep={tuple(sweep)}: {bad} outside 1..{stored}, the neighbours the "
            "records store (data.num_neighbours_stored)"
        )
    return k, sweep


def checkpoint_source(config, workdir: str) -> str:
    """Where the evaluated checkpoint comes from: eval.checkpoint_workdir (one trained model
    scored against the database prepared in `workdir`), else `workdir` itself. A RetroError
    naming the setting when it holds no checkpoint."""
    source = str(config.eval.get("checkpoint_workdir", "") or "")
    if not source:
        return workdir
    try:
        find_checkpoints(source)
    except RetroError as e:
        raise RetroError(f"eval.checkpoint_workdir={source}: {e}") from None
    return source


# ---------------------------------------------------------------- the evaluation pass


def evaluate(config, workdir: str, *, progress: bool = True) -> dict:
    """Score the eval records of `workdir` (see the module docstring) with the checkpoint of
    `workdir`, or of eval.checkpoint_workdir when set; returns the metrics."""
    from retro_jax.data.pipeline import EvalBatches, keep_continuation

    prepare_dir = prepare_dir_of(config, workdir)
    spec, info = load_records_info(prepare_dir)
    k, sweep = _neighbour_counts(config, spec.num_neighbours)
    check_fractions(config.eval.get("database_fractions", ()) or ())  # before loading anything
    mesh = make_mesh(config.mesh)
    batch_size = int(config.eval.batch_size)
    check_batch_divides(batch_size, mesh, "eval.batch_size")
    baseline_dir = str(config.eval.baseline_workdir or "")
    if baseline_dir:
        find_checkpoints(baseline_dir)  # fail before loading anything
    model_dir = checkpoint_source(config, workdir)
    checkpoints_dir, _ = find_checkpoints(model_dir)
    model, step = load_model(model_dir, mesh=mesh)
    _check_model(model.config, info, spec, checkpoints_dir)
    retro = TokenScorer(model)
    # mode -> (scorer, neighbours read, whose neighbours: None = the records', i = subset i's)
    passes = {"retrieval": (retro, k, None), "no_retrieval": (retro, 0, None)}
    baseline_step = None
    if baseline_dir:
        baseline_model, baseline_step = load_model(baseline_dir, mesh=mesh)
        _check_model(baseline_model.config, info, spec, f"eval.baseline_workdir={baseline_dir}")
        if baseline_model.config.vocab_size != model.config.vocab_size:
            raise RetroError(
                f"eval.baseline_workdir={baseline_dir}: vocab_size "
                f"{baseline_model.config.vocab_size} differs from the RETRO checkpoint's "
                f"{model.config.vocab_size} (they must share the tokenizer)"
            )
        passes["baseline"] = (TokenScorer(baseline_model), 0, None)
    for j in sweep:
        if j != k:
            passes[f"k={j}"] = (retro, j, None)
    if model.config.is_baseline:
        print(f"eval: {workdir} holds a baseline model: retrieval changes nothing")
    database = DatabaseSweep.from_config(config, prepare_dir, k=k, stored=spec.num_neighbours)
    for i, f in enumerate(database.fractions if database else ()):
        passes[f"db={f}"] = (retro, k, i)

    batches = EvalBatches(
        prepare_dir,
        global_batch=batch_size,
        num_neighbours=spec.num_neighbours,
        max_batches=int(config.eval.max_batches),
        continuation=keep_continuation(config),
    )
    pad_id = int(info.get("pad_id", model.config.pad_id))
    subset_ids = None  # [F, R, l, k]: this host's eval rows' neighbours in each subset
    if database is not None:
        tokens = [batch["tokens"] for batch in batches]  # the rows of the pass below, in order
        subset_ids = database.find(np.concatenate(tokens), progress=progress)
    histogram = LeakageHistogram(
        spec.chunk_size,
        [m for m in LEAKAGE_MODES if m in passes],
        reference="baseline" if "baseline" in passes else None,
    )
    nll_sums = np.zeros(len(passes), np.float64)
    counts = np.zeros(2, np.float64)  # scored tokens, bytes
    positions = 0
    start = time.perf_counter()
    first_done = None
    bar = tqdm(batches, total=batches.num_batches, desc="eval", unit="batch", disable=not progress)
    with jax.set_mesh(mesh):
        for b, batch in enumerate(bar):
            mask = batch["loss_mask"].astype(np.float64)
            # r(C) against the neighbours RETRO reads: the first k stored ones
            overlap = chunk_overlap(batch["tokens"], batch["neighbours"], pad_id, k=k)  # [b, l]
            placed = {None: shard_batch({name: batch[name] for name in _INPUTS}, mesh)}
            rows = slice(b * len(mask), (b + 1) * len(mask))
            for i in range(len(subset_ids) if subset_ids is not None else 0):
                neighbours = database.entries(subset_ids[i, rows], batch["tokens"])
                if not np.array_equal(neighbours[:, :, :k], batch["neighbours"][:, :, :k]):
                    placed[i] = {**placed[None], "neighbours": shard_batch(neighbours, mesh)}
            # A subset that gives this batch the records' own neighbours (the whole database
            # searched exactly, as prepare did) is scored by the retrieval pass already.
            nll = {
                mode: scorer(placed[src], kk)
                for mode, (scorer, kk, src) in passes.items()
                if src in placed
            }
            nll.update({mode: nll["retrieval"] for mode in passes if mode not in nll})
            nll = {mode: _host_local(v, mesh).astype(np.float64) for mode, v in nll.items()}
            histogram.add(overlap, mask, batch["target_bytes"], nll)
            nll_sums += [float(np.sum(nll[mode] * mask)) for mode in passes]
            counts += [mask.sum(), float(np.sum(batch["target_bytes"] * mask))]
            if first_done is None:
                first_done = time.perf_counter()  # the first batch includes compilation
            else:
                positions += mask.size * len(passes)
    bar.close()
    seconds = time.perf_counter() - start
    steady = time.perf_counter() - (first_done or start)

    # Every host scored its own records: sum everything over hosts.
    nll_sums, counts = _sum_over_hosts(nll_sums), _sum_over_hosts(counts)
    histogram.load_arrays(_sum_over_hosts(histogram.arrays()))
    totals = {mode: summary(nll_sums[i], *counts) for i, mode in enumerate(passes)}
    leakage = [
        {
            "alpha": row["alpha"],
            "chunks": row["chunks"],
            "retrieval_bpb": row["retrieval_bpb"],
            "no_retrieval_bpb": row["no_retrieval_bpb"],
            "baseline_bpb": row.get("baseline_bpb"),
            # standard errors of RETRO's and RETRO[OFF]'s bpb minus the baseline's over the
            # bucket's chunks (retro_jax/leakage.py); None without a baseline
            "retrieval_se": row.get("retrieval_se"),
            "no_retrieval_se": row.get("no_retrieval_se"),
            "tokens": row["tokens"],
            "bytes": row["bytes"],
        }
        for row in histogram.curve(ALPHAS)
    ]
    metrics = {
        "retrieval": {**totals["retrieval"], "num_neighbours": k},
        "no_retrieval": totals["no_retrieval"],
        "baseline": totals.get("baseline"),
        "leakage": leakage,
        "leakage_neighbours": k,  # r(C) is measured against the k neighbours RETRO reads
        "checkpoint": {"path": checkpoints_dir, "step": int(step)},
        "baseline_checkpoint": (
            {"path": baseline_dir, "step": int(baseline_step)} if baseline_dir else None
        ),
        "records": {
            "seq_len": spec.seq_len,
            "chunk_size": spec.chunk_size,
            "batches": batches.num_batches,
            "batch_size": batch_size,
        },
        "timing": {
            "seconds": round(seconds, 3),
            "passes": len(passes),
            # positions run through a model per second, after the first (compiling) batch
            "tokens_per_s": round(positions / steady, 1) if positions and steady > 0 else None,
        },
    }
    if sweep:
        metrics["neighbour_sweep"] = [
            {
                "num_neighbours": j,
                "bpb": totals["retrieval" if j == k else f"k={j}"]["bpb"],
                "loss": totals["retrieval" if j == k else f"k={j}"]["loss"],
            }
            for j in sweep
        ]
    if database is not None:
        modes = [f"db={f}" for f in database.fractions]
        metrics["database_sweep"] = database.rows(
            [totals[mode]["bpb"] for mode in modes], [totals[mode]["loss"] for mode in modes]
        )
    return metrics


# ---------------------------------------------------------------- outputs


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(metrics: dict) -> str:
    """The readable summary `retro-jax eval` prints."""
    k = metrics["retrieval"]["num_neighbours"]
    lines = [f"{'':<16}{'bpb':>9}{'loss':>9}{'tokens':>10}{'bytes':>10}"]
    for mode, label in (
        ("retrieval", f"RETRO (k={k})"),
        ("no_retrieval", "RETRO[OFF]"),
        ("baseline", "baseline"),
    ):
        row = metrics.get(mode)
        if row:
            lines.append(
                f"{label:<16}{_fmt(row['bpb']):>9}{_fmt(row['loss']):>9}"
                f"{row['tokens']:>10}{row['bytes']:>10}"
            )
    lines += [
        "",
        "leakage: bpb over chunks with r(C) <= alpha (r(C) over the "
        f"{metrics['leakage_neighbours']} neighbours RETRO reads)",
    ]
    lines += curve_lines(metrics["leakage"])
    if metrics.get("neighbour_sweep"):
        lines += ["", f"{'k':>7}{'bpb':>10}"]
        lines += [
            f"{r['num_neighbours']:>7}{_fmt(r['bpb']):>10}" for r in metrics["neighbour_sweep"]
        ]
    if metrics.get("database_sweep"):
        lines += [
            "",
            f"database: RETRO (k={k}), neighbours searched exactly in the first documents by"
            " doc_id",
            f"{'fraction':>9}{'chunks':>10}{'tokens':>12}{'bpb':>10}",
        ]
        lines += [
            f"{r['fraction']:>9.4g}{r['chunks']:>10}{r['tokens']:>12}{_fmt(r['bpb']):>10}"
            for r in metrics["database_sweep"]
        ]
    return "\n".join(lines)


def write_outputs(metrics: dict, eval_dir: str) -> list[str]:
    """metrics.json, leakage.png, with a sweep neighbours.png and with database fractions
    database.png under eval_dir; their paths."""
    files.makedirs(eval_dir)
    paths = [os.path.join(eval_dir, "metrics.json"), os.path.join(eval_dir, "leakage.png")]
    files.write_json(paths[0], metrics, indent=1)  # through a temporary name
    plot_leakage(metrics, paths[1])
    for key, name, plot in (
        ("neighbour_sweep", "neighbours.png", plot_neighbours),
        ("database_sweep", "database.png", plot_database),
    ):
        if metrics.get(key):
            paths.append(os.path.join(eval_dir, name))
            plot(metrics, paths[-1])
    return paths


def main(config, workdir: str | None) -> dict:
    """`retro-jax eval`: see docs/eval.md."""
    if not workdir:
        raise RetroError("eval: --workdir is required (it holds prepare/ and checkpoints/)")
    metrics = evaluate(config, workdir)
    if jax.process_index() == 0:
        paths = write_outputs(metrics, os.path.join(workdir, "eval"))
        step = metrics["checkpoint"]["step"]
        path = metrics["checkpoint"]["path"]
        other = "" if path == os.path.join(workdir, "checkpoints") else f" of {path}"
        print(f"eval: {workdir} (checkpoint step {step}{other})")
        print(format_table(metrics))
        print("eval: wrote " + ", ".join(paths))
    return metrics
