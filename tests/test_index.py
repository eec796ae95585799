"""NeighbourIndex: exact search, sharding, ScaNN recall, persistence and errors."""

import json
import os

import numpy as np
import pytest

from retro_jax.errors import RetroError
from retro_jax.retrieval import NeighbourIndex


def exact_neighbours(keys, queries, k):
    """Reference: full squared-L2 matrix in float64 and argsort."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, axis=1)


def clustered(n, dim=32, centers=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)) * 2.0
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def scann_index():
    """ScaNN shard of 3,000 keys + exact shard of 1,500 (shard_size 3,000, exact below 2,000)."""
    keys = clustered(4500)
    index = NeighbourIndex.build(
        keys, brute_force_below=2000, shard_size=3000, progress=False, model_id="bert@x"
    )
    return keys, index


def test_exact_search_equals_numpy_argsort():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(700, 16)).astype(np.float32)
    queries = rng.normal(size=(25, 16)).astype(np.float32)
    index = NeighbourIndex.build(keys, progress=False)
    ids, dist = index.search(queries, 10)
    ref_ids, ref_dist = exact_neighbours(keys, queries, 10)
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (25, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5)
    assert len(index) == 700 and index.shards[0].kind == "exact"


def test_exact_search_breaks_ties_by_the_lower_id():
    """Duplicate database chunks have identical keys: of tied keys the lower id comes first,
    whatever order the shortlist found them in, as a stable argsort gives (so prepare and the
    eval database sweep, whose queries differ in the last bits, agree on tied neighbours)."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 8)).astype(np.float32)
    keys = np.concatenate([base, base[::-1], base])  # every key three times
    queries = base[:20] + rng.normal(size=(20, 8)).astype(np.float32) * 0.01
    ids, _ = NeighbourIndex.build(keys, progress=False).search(queries, 3)
    np.testing.assert_array_equal(ids, exact_neighbours(keys, queries, 3)[0])


def test_sharded_exact_search_equals_unsharded():
    keys = clustered(1000, dim=8, seed=2)
    queries = clustered(30, dim=8, seed=3)
    whole = NeighbourIndex.build(keys, progress=False).search(queries, 7)
    index = NeighbourIndex.build(keys, shard_size=64, progress=False)
    assert len(index.shards) == 16 and len(index) == 1000
    ids, dist = index.search(queries, 7)
    np.testing.assert_array_equal(ids, whole[0])
    np.testing.assert_allclose(dist, whole[1], rtol=1e-6)


def test_tiny_shards_are_exact_even_when_brute_force_is_off():
    index = NeighbourIndex.build(clustered(1500), brute_force_below=0, shard_size=900)
    assert [s.kind for s in index.shards] == ["exact", "exact"]


def test_fewer_keys_than_k_pads_with_minus_one_and_inf():
    keys = np.eye(3, 4, dtype=np.float32)
    ids, dist = NeighbourIndex.build(keys, shard_size=2, progress=False).search(keys, 5)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(ids[:, 3:], -1)
    assert np.isinf(dist[:, 3:]).all() and np.isfinite(dist[:, :3]).all()
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-6)


def test_scann_recall_at_10_on_clustered_keys(scann_index):
    keys, index = scann_index
    assert [s.kind for s in index.shards] == ["scann", "exact"]
    no_ids, no_dist = index.search(np.zeros((0, 32), np.float32), 10)
    assert no_ids.shape == no_dist.shape == (0, 10)
    queries = clustered(200, seed=5)
    ids, dist = index.search(queries, 10)
    ref_ids, ref_dist = exact_neighbours(keys, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
    assert recall >= 0.9, recall
    assert (np.diff(dist, axis=1) >= 0).all()
    # Reordering is exact: a returned distance is the true squared L2 of the returned key.
    true = ((keys[ids] - queries[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-3)


def test_save_load_roundtrip_gives_identical_results(scann_index, tmp_path):
    keys, index = scann_index
    directory = tmp_path / "index"
    index.save(str(directory))
    index.save(str(directory))  # saving over an existing index replaces it
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary folders left behind
    meta = NeighbourIndex.read_metadata(str(directory))
    assert (meta["dim"], meta["count"], meta["model_id"]) == (32, 4500, "bert@x")
    loaded = NeighbourIndex.load(str(directory))
    assert len(loaded) == 4500 and loaded.dim == 32 and loaded.model_id == "bert@x"
    queries = clustered(50, seed=7)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem(tmp_path):
    index = NeighbourIndex.build(np.zeros((10, 4), np.float32), progress=False)
    with pytest.raises(RetroError, match="dimension 4"):
        index.search(np.zeros((2, 5), np.float32), 3)
    with pytest.raises(RetroError, match="k must be positive"):
        index.search(np.zeros((2, 4), np.float32), 0)
    with pytest.raises(RetroError, match=r"\[N, D\]"):
        NeighbourIndex.build(np.zeros(10, np.float32), progress=False)
    bad = np.zeros((10, 4), np.float32)
    bad[7, 1] = np.nan
    with pytest.raises(RetroError, match="NaN"):
        NeighbourIndex.build(bad, shard_size=5, progress=False)
    missing = str(tmp_path / "absent")
    with pytest.raises(RetroError, match="absent.*missing"):
        NeighbourIndex.load(missing)
    index.save(str(tmp_path / "broken"))
    os.remove(tmp_path / "broken" / "shard-00000" / "keys.npy")
    with pytest.raises(RetroError, match="broken.*corrupt"):
        NeighbourIndex.load(str(tmp_path / "broken"))
    (tmp_path / "broken" / "index.json").write_text("{not json")
    with pytest.raises(RetroError, match="broken.*corrupt"):
        NeighbourIndex.load(str(tmp_path / "broken"))
    meta_path = tmp_path / "other" / "index.json"
    index.save(str(tmp_path / "other"))
    meta = json.loads(meta_path.read_text())
    meta["count"] = 11
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RetroError, match="not 11"):
        NeighbourIndex.load(str(tmp_path / "other"))


def test_exact_index_does_not_import_scann_or_tensorflow(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from retro_jax.retrieval import NeighbourIndex\n"
        "i = NeighbourIndex.build(np.ones((50, 3), np.float32), progress=False)\n"
        f"i.save({str(tmp_path / 'ix')!r}); NeighbourIndex.load({str(tmp_path / 'ix')!r})\n"
        "print(sorted(m for m in ('scann', 'tensorflow') if m in sys.modules))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_scann_build_is_deterministic(tmp_path):
    """The same keys give byte-identical ScaNN files (resume and the Beam path rely on it)."""
    keys = clustered(6000, dim=64, centers=80, seed=3)
    for run in ("a", "b"):
        NeighbourIndex.build(keys, brute_force_below=0, progress=False).save(str(tmp_path / run))
    names = sorted(os.listdir(tmp_path / "a" / "shard-00000"))
    assert "serialized_partitioner.pb" in names
    for name in names:
        a = (tmp_path / "a" / "shard-00000" / name).read_bytes()
        assert a == (tmp_path / "b" / "shard-00000" / name).read_bytes(), name
