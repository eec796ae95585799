"""NeighbourIndex: k nearest keys by squared L2, exact for small databases, ScaNN above.

The database is cut into shards of at most `shard_size` keys (global row ids stay those of the
keys passed to `build`). A shard smaller than `brute_force_below` is searched exactly with a
numpy matmul; a larger one gets a ScaNN searcher (k-means tree + asymmetric hashing + exact
reordering, the paper's retriever). Each query asks every shard for k and the results are
merged by distance. scann (and with it TensorFlow) is imported only when a ScaNN shard is built
or loaded, so small indexes and everything else in retro_jax work without it.

On disk, `directory/index.json` (dim, count, model_id, shards, parameters) and one folder per
shard: `shard-00000/keys.npy` for exact shards, ScaNN's serialized assets otherwise. The folder
may be remote (gs://...): ScaNN then serialises to and loads from a local temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import uuid

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError

FORMAT_VERSION = 1
MIN_SCANN_KEYS = 1000  # smaller shards are always exact: too few keys to train a tree on
_BLOCK_ELEMENTS = 1 << 25  # query x key distance entries computed at once by the exact search


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """Tree + asymmetric hashing + reordering settings of one ScaNN shard."""

    num_leaves: int
    leaves_to_search: int
    reorder: int
    training_sample_size: int

    @classmethod
    def for_size(cls, n: int, num_leaves=0, leaves_to_search=0, reorder=0) -> ScannParams:
        """Defaults from the shard size n; nonzero arguments win.

        Measured on real MiniLM keys (benchmarks/results/retrieval.md): recall is limited by
        how many leaves are searched, not by reordering. 2 sqrt(n) leaves with a tenth of them
        searched gave recall@10 0.94 at 100k keys and 0.93 at 1M, so 15% are searched. Leaves
        keep >= 100 keys each.
        """
        leaves = num_leaves or max(2, min(int(round(2 * math.sqrt(n))), n // 100))
        search = leaves_to_search or max(8, int(math.ceil(leaves * 0.15)))
        return cls(
            num_leaves=leaves,
            leaves_to_search=min(search, leaves),
            reorder=reorder or 100,
            training_sample_size=min(n, max(100_000, 50 * leaves)),
        )


def _exact_search(
    keys: np.ndarray, queries: np.ndarray, k: int, key_sq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by squared L2. keys [N, D], queries [Q, D] -> ids [Q, k'], dist [Q, k'] with
    k' = min(k, N), ascending. key_sq [N]: the keys' squared norms, if already known."""
    n = len(keys)
    kk = min(k, n)
    ids = np.zeros((len(queries), kk), np.int64)
    dist = np.zeros((len(queries), kk), np.float32)
    if kk == 0:
        return ids, dist
    if key_sq is None:
        key_sq = np.einsum("nd,nd->n", keys, keys)
    # Shortlist by the expanded form |q|^2 - 2 q.k + |k|^2 (one matmul), then recompute the
    # shortlisted distances directly, which is exact where the expansion cancels badly.
    shortlist = min(n, kk + 16)
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        partial = key_sq[None, :] - 2.0 * (q @ keys.T)
        if shortlist < n:
            # (sorted: argpartition leaves them in no particular order, and the stable argsort
            # below must see tied keys in id order, as a plain argsort does)
            cand = np.sort(np.argpartition(partial, shortlist - 1, axis=1)[:, :shortlist], axis=1)
        else:
            cand = np.broadcast_to(np.arange(n), (len(q), n))
        diff = keys[cand] - q[:, None, :]  # [block, shortlist, D]
        exact = np.einsum("bsd,bsd->bs", diff, diff)
        best = np.argsort(exact, axis=1, kind="stable")[:, :kk]
        ids[start : start + len(q)] = np.take_along_axis(cand, best, axis=1)
        dist[start : start + len(q)] = np.take_along_axis(exact, best, axis=1)
    return ids, dist


def _scann_module():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except Exception as e:  # scann raises NotFoundError (not ImportError) on a TF mismatch
        raise RetroError(
            f"the ScaNN index needs scann==1.4.2 with tensorflow-cpu 2.20 ({e})"
        ) from e
    return scann_ops_pybind


class _Shard:
    """Keys [count, D] starting at global row `start`: exact (keys kept) or a ScaNN searcher."""

    def __init__(self, start, count, keys=None, searcher=None, params=None):
        self.start, self.count = start, count
        self.keys, self.searcher, self.params = keys, searcher, params
        self._key_sq = None  # squared norms of exact keys, computed on the first search

    @property
    def kind(self) -> str:
        return "exact" if self.searcher is None else "scann"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.searcher is None:
            if self._key_sq is None:
                self._key_sq = np.einsum("nd,nd->n", self.keys, self.keys)
            ids, dist = _exact_search(self.keys, queries, k, self._key_sq)
        else:
            kk = min(k, self.count)
            ids, dist = self.searcher.search_batched_parallel(
                queries,
                final_num_neighbors=kk,
                pre_reorder_num_neighbors=max(self.params.reorder, kk),
                leaves_to_search=self.params.leaves_to_search,
            )
            ids = np.asarray(ids, np.int64)
            dist = np.asarray(dist, np.float32)
        return ids + self.start, dist


def _build_scann(keys: np.ndarray, params: ScannParams):
    """A ScaNN searcher, built deterministically: k-means++ initialisation (ScaNN's random
    initialisation is not seeded) and one training thread (threaded k-means assigns a few
    points differently from run to run). The same keys give the same index in any process, so
    a resumed or distributed prepare writes the same files as an uninterrupted local one."""
    scann = _scann_module()
    dims_per_block = 2
    builder = (
        scann.builder(keys, 10, "squared_l2")
        .tree(
            num_leaves=params.num_leaves,
            num_leaves_to_search=params.leaves_to_search,
            training_sample_size=params.training_sample_size,
            random_init=False,
        )
        .score_ah(dims_per_block, anisotropic_quantization_threshold=float("nan"))
        .reorder(params.reorder)
    )
    builder.set_n_training_threads(1)
    return builder.build()


def shard_starts(n: int, shard_size: int) -> list[int]:
    """First row of each index shard of n keys."""
    if shard_size <= 0:
        raise RetroError(f"retrieval.index.shard_size must be positive, got {shard_size}")
    return list(range(0, n, shard_size)) or [0]


def build_shard(
    part: np.ndarray,
    start: int,
    *,
    brute_force_below: int,
    num_leaves: int = 0,
    leaves_to_search: int = 0,
    reorder: int = 0,
    **_,
) -> _Shard:
    """One shard over keys part [count, D] (global rows start..): exact below
    brute_force_below keys, else a ScaNN searcher with parameters from its size."""
    if not np.isfinite(part).all():
        raise RetroError(f"index: keys {start}..{start + len(part)} contain NaN or inf")
    if len(part) < max(brute_force_below, MIN_SCANN_KEYS):
        return _Shard(start, len(part), keys=np.array(part, np.float32))
    part = np.ascontiguousarray(part, dtype=np.float32)
    params = ScannParams.for_size(len(part), num_leaves, leaves_to_search, reorder)
    return _Shard(start, len(part), searcher=_build_scann(part, params), params=params)


def save_shard(shard: _Shard, directory: str, index: int) -> dict:
    """Write shard `index` to directory/shard-NNNNN/; returns its index.json entry."""
    name = f"shard-{index:05d}"
    folder = os.path.join(directory, name)
    files.makedirs(folder)
    meta = dict(name=name, kind=shard.kind, start=shard.start, count=shard.count)
    if shard.searcher is None:
        files.save_npy(os.path.join(folder, "keys.npy"), shard.keys)
    elif not files.is_remote(folder):
        # relative_path=True: the assets must stay valid after the folder is renamed.
        shard.searcher.serialize(folder, relative_path=True)
    else:
        with tempfile.TemporaryDirectory(prefix="retro_jax-scann-") as local:
            shard.searcher.serialize(local, relative_path=True)
            files.copy_tree(local, folder)
    if shard.searcher is not None:
        meta["params"] = dataclasses.asdict(shard.params)
    return meta


def gather_rows(shards, per_shard: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of an array stored in shards of per_shard rows -> float32 copy."""
    first, last = start // per_shard, (stop - 1) // per_shard
    parts = [np.asarray(shards[i]) for i in range(first, last + 1)]
    joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
    offset = first * per_shard
    return np.array(joined[start - offset : stop - offset], np.float32)


def build_index_shard(key_shards, per_shard: int, total: int, number: int, directory, settings):
    """Index shard `number` (keys number*shard_size ..) of `total` keys stored in shards of
    per_shard rows: built and saved to directory/shard-NNNNN. Returns its index.json entry.
    Both prepare drivers build the index this way, one index shard in memory at a time."""
    start = number * int(settings["shard_size"])
    stop = min(start + int(settings["shard_size"]), total)
    part = gather_rows(key_shards, per_shard, start, stop)
    return save_shard(build_shard(part, start, **settings), directory, number)


def load_shard(directory: str, entry: dict, dim: int) -> _Shard:
    """One shard of a saved index, from its index.json entry."""
    folder = os.path.join(directory, entry["name"])
    if entry["kind"] == "exact":
        keys = files.load_npy(os.path.join(folder, "keys.npy"), mmap=False)
        if keys.shape != (entry["count"], dim):
            raise RetroError(f"index {directory}: {entry['name']} has shape {keys.shape}")
        return _Shard(entry["start"], entry["count"], keys=keys)
    if not files.isfile(os.path.join(folder, "scann_assets.pbtxt")):
        raise RetroError(f"index {directory}: {entry['name']} has no ScaNN assets")
    with files.local_copy(folder) as local:  # (ScaNN reads its assets into memory)
        searcher = _scann_module().load_searcher(local)
    params = ScannParams(**entry["params"])
    return _Shard(entry["start"], entry["count"], searcher=searcher, params=params)


def write_metadata(directory: str, dim: int, model_id: str, settings: dict, shards: list) -> None:
    """index.json: what `NeighbourIndex.load` reads (shard entries in shard order)."""
    meta = dict(
        format_version=FORMAT_VERSION,
        dim=dim,
        count=sum(s["count"] for s in shards),
        model_id=model_id,
        settings=settings,
        shards=sorted(shards, key=lambda s: s["start"]),
    )
    files.write_json(os.path.join(directory, "index.json"), meta, indent=1)


def merge_topk(found: list[tuple[np.ndarray, ...]], q: int, k: int) -> tuple[np.ndarray, ...]:
    """Per-shard results (ids [Q, k_i], dist [Q, k_i], *extra [Q, k_i]), in shard order -> the
    k nearest of all: (ids int64, dist float32, *extra) [Q, k], ascending (stable: ties keep
    shard order); ids and extras -1, dist inf where fewer than k were found."""
    width = len(found[0]) if found else 2
    fills = [-1, np.inf] + [-1] * (width - 2)
    merged = [
        np.concatenate(
            [np.asarray(f[i]) for f in found]
            + [np.full((q, k), fills[i], np.float32 if i == 1 else np.int64)],
            axis=1,
        )
        for i in range(width)
    ]
    best = np.argsort(merged[1], axis=1, kind="stable")[:, :k]
    return tuple(np.take_along_axis(a, best, axis=1) for a in merged)


class NeighbourIndex:
    """k-nearest-neighbour search over a fixed database of keys by squared L2."""

    def __init__(self, shards: list[_Shard], dim: int, model_id: str = "", settings=None):
        self.shards = shards
        self.dim = dim
        self.model_id = model_id
        self.settings = dict(settings or {})

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        *,
        brute_force_below: int = 20_000,
        shard_size: int = 2_000_000,
        num_leaves: int = 0,
        leaves_to_search: int = 0,
        reorder: int = 0,
        progress: bool = True,
        model_id: str = "",
    ) -> NeighbourIndex:
        """Index keys [N, D]; shards below brute_force_below keys are searched exactly."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] == 0:
            raise RetroError(f"index: keys must be [N, D] with D > 0, got shape {keys.shape}")
        settings = dict(
            brute_force_below=brute_force_below,
            shard_size=shard_size,
            num_leaves=num_leaves,
            leaves_to_search=leaves_to_search,
            reorder=reorder,
        )
        starts = shard_starts(len(keys), shard_size)
        shards = [
            build_shard(keys[start : start + shard_size], start, **settings)
            for start in tqdm(starts, desc="index shards", unit="shard", disable=not progress)
        ]
        return cls(shards, keys.shape[1], model_id=model_id, settings=settings)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> ids int64 [Q, k], squared L2 float32 [Q, k], ascending; -1 / inf
        where the database has fewer than k keys."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetroError(
                f"index: queries of shape {queries.shape} do not match the index dimension "
                f"{self.dim}"
            )
        if k <= 0:
            raise RetroError(f"index: k must be positive, got {k}")
        q = len(queries)
        if q == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return merge_topk([s.search(queries, k) for s in self.shards if s.count], q, k)

    # -----------------------------------------------------------------------------------------
    # Persistence

    def save(self, directory: str) -> None:
        """Write to a temporary sibling folder, then rename it to `directory` (replacing it)."""
        directory = directory.rstrip("/")
        if not files.is_remote(directory):
            directory = os.path.abspath(directory)
        files.makedirs(os.path.dirname(directory))
        tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
        files.makedirs(tmp)
        try:
            shard_meta = [save_shard(shard, tmp, i) for i, shard in enumerate(self.shards)]
            write_metadata(tmp, self.dim, self.model_id, self.settings, shard_meta)
            if files.exists(directory):
                old = directory + ".old"
                files.delete(old)
                files.replace(directory, old)
                files.replace(tmp, directory)
                files.delete(old)
            else:
                files.replace(tmp, directory)
        except BaseException:
            files.delete(tmp)
            raise

    @staticmethod
    def read_metadata(directory: str) -> dict:
        """index.json of a saved index (dim, count, model_id, shards); RetroError if absent."""
        path = os.path.join(directory, "index.json")
        try:
            meta = files.read_json(path)
        except FileNotFoundError as e:
            raise RetroError(f"index {directory}: missing (no index.json)") from e
        except (OSError, json.JSONDecodeError) as e:
            raise RetroError(f"index {directory}: corrupt index.json ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise RetroError(f"index {directory}: unknown format {meta.get('format_version')}")
        return meta

    @classmethod
    def load(cls, directory: str) -> NeighbourIndex:
        """The index saved in `directory`; RetroError naming it if missing or corrupt."""
        meta = cls.read_metadata(directory)
        try:
            shards = [load_shard(directory, s, int(meta["dim"])) for s in meta["shards"]]
        except RetroError:
            raise
        except Exception as e:  # numpy / scann errors on truncated or missing files
            raise RetroError(f"index {directory}: corrupt ({type(e).__name__}: {e})") from e
        index = cls(shards, int(meta["dim"]), meta.get("model_id", ""), meta.get("settings"))
        if len(index) != meta["count"]:
            raise RetroError(
                f"index {directory}: shards hold {len(index)} keys, not {meta['count']}"
            )
        return index
