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
