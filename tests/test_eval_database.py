"""The evaluation database sweep (retro_jax/eval_database.py) on a synthetic chunk database: nested
subsets of whole documents by doc_id, exact search inside a subset against brute force, the
neighbours laid out as the eval batches carry them, and the one-line error for a bad fraction.
No BERT and no model: a fake embedder stands in (the end-to-end checks are in test_evaluate)."""

import numpy as np
import pytest

from retro_jax.errors import RetroError
from retro_jax.eval_database import (
    DatabaseSweep,
    check_fractions,
    database_subsets,
    exact_neighbours,
)
from retro_jax.retrieval import NeighbourIndex
from retro_jax.retrieval.align import neighbour_entries
from retro_jax.retrieval.chunks import ChunkDatabase, write_chunk_shard, write_database_info

M, PAD, EOS, DIM = 4, 0, 1, 8
FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def make_database(directory, docs=23, per_shard=16, seed=0):
    """docs documents of 1..9 chunks, in source order (not doc_id order); the last chunk of
    each is half padding. Returns the ChunkDatabase."""
    rng = np.random.default_rng(seed)
    doc_ids = rng.integers(0, 2**62, docs)
    tokens, owners, table = [], [], []
    for doc in doc_ids:
        count = int(rng.integers(1, 10))
        text = rng.integers(2, 60, count * M - M // 2)
        padded = np.full((count + 1) * M, PAD, np.int32)
        padded[: len(text)] = text
        blocks = padded.reshape(count + 1, M)
        table.append((int(doc), sum(len(t) for t in tokens), count))
        tokens.append(np.concatenate([blocks[:-1], blocks[1:]], axis=1))
        owners.append(np.full(count, doc, np.int64))
    tokens, owners = np.concatenate(tokens), np.concatenate(owners)
    shards = []
    for i, start in enumerate(range(0, len(tokens), per_shard)):
        write_chunk_shard(
            directory, i, tokens[start : start + per_shard], owners[start : start + per_shard]
        )
        shards.append(len(tokens[start : start + per_shard]))
    write_database_info(
        directory,
        table,
        chunk_size=M,
        chunks_per_shard=per_shard,
        shards=shards,
        short_documents=0,
        short_examples=[],
        tokens=int((tokens[:, :M] != PAD).sum()),
        pad_id=PAD,
        eos_id=EOS,
    )
    return ChunkDatabase(directory)


class FakeEmbedder:
    """Keys of texts: a fixed random vector per distinct text (BERT's role, deterministic)."""

    dim = DIM

    def __init__(self):
        self.calls = []

    def embed(self, texts, progress=None):
        self.calls.append(list(texts))
        out = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=DIM) for t in texts]
        return np.array(out, np.float32).reshape(len(texts), DIM)


class FakeTokenizer:
    pad_id, eos_id = PAD, EOS

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids if i not in (PAD, EOS))


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return make_database(str(tmp_path_factory.mktemp("db")))


def test_subsets_are_nested_prefixes_of_documents_by_doc_id(database):
    subsets = database_subsets(database, (1.0, 0.25, 0.125, 0.5, 0.25))
    assert [s.fraction for s in subsets] == list(FRACTIONS)  # sorted, distinct
    table = np.asarray(database.docs)
    assert (np.diff(table[:, 0]) > 0).all()  # the docs table is in doc_id order
    total = len(database)
    chunks = [s.chunks for s in subsets]
    assert chunks == sorted(chunks) and len(set(chunks)) == len(chunks)
    assert chunks[-1] == total and (subsets[-1].ids == np.arange(total)).all()
    for small, large in zip(subsets, subsets[1:]):
        assert set(small.ids) < set(large.ids)
    owners = database.doc_ids(np.arange(total))
    for s in subsets:
        assert (np.diff(s.ids) > 0).all()  # chunk-id order: ties break as in the whole index
        docs = table[: s.documents, 0]
        assert set(owners[s.ids]) == set(docs)  # whole documents, the first by doc_id
        assert (owners == docs[:, None]).any(0).sum() == s.chunks
        assert s.chunks >= s.fraction * total  # reaches f * N ...
        assert s.chunks - table[s.documents - 1, 2] < s.fraction * total  # ... with no doc spare
        entries = database.entries(s.ids)[:, :M]
        assert s.tokens == (entries != PAD).sum() and s.tokens < s.chunks * M


@pytest.mark.parametrize("fractions", [(0.5, 0.0), (1.5,), (-0.25, 1.0)])
def test_a_fraction_outside_0_1_is_one_line(fractions):
    bad = next(f for f in fractions if not 0 < f <= 1)
    with pytest.raises(RetroError, match=rf"^eval.database_fractions=.*: {bad} is outside"):
        check_fractions(fractions)
    assert check_fractions(()) == () and check_fractions((1, 0.5)) == (0.5, 1.0)


def test_exact_search_in_a_subset_equals_brute_force(database):
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(len(database), DIM)).astype(np.float32)
    queries = rng.normal(size=(40, DIM)).astype(np.float32)
    k = 3
    for subset in database_subsets(database, FRACTIONS):
        got = exact_neighbours(keys, subset, queries, k)
        dist = ((queries[:, None, :] - keys[subset.ids][None]) ** 2).sum(-1)
        expected = subset.ids[np.argsort(dist, axis=1, kind="stable")[:, :k]]
        np.testing.assert_array_equal(got, expected)
    whole, _ = NeighbourIndex.build(keys, brute_force_below=10**6, progress=False).search(
        queries, k
    )
    np.testing.assert_array_equal(exact_neighbours(keys, subset, queries, k), whole)
    first = database_subsets(database, (1e-9,))[0]  # one document: fewer chunks than asked
    few = exact_neighbours(keys, first, queries, first.chunks + 2)
    assert (few[:, -2:] == -1).all() and set(few[:, 0]) <= set(first.ids)


@pytest.mark.parametrize("align,continuation", [(False, True), (True, False)])
def test_find_and_entries(database, align, continuation):
    """Eval rows [R, n] -> ids per subset (chunks without text: none), and the entries of the
    same layout as the records' [B, l, K, 2m], built by neighbour_entries."""
    k, stored, rows, chunks = 2, 4, 3, 5
    embedder = FakeEmbedder()
    keys = embedder.embed([f"db {i}" for i in range(len(database))])
    sweep = DatabaseSweep(
        database,
        keys,
        embedder,
        FakeTokenizer(),
        database_subsets(database, FRACTIONS),
        k=k,
        stored=stored,
        align=align,
        continuation=continuation,
    )
    rng = np.random.default_rng(2)
    tokens = rng.integers(2, 60, (rows, chunks * M)).astype(np.int32)
    tokens[0, M : 2 * M] = [EOS, PAD, PAD, PAD]  # no text: no neighbours
    tokens[1, :M] = tokens[2, :M]  # the same chunk twice: embedded once
    embedder.calls.clear()
    ids = sweep.find(tokens, progress=False)
    assert ids.shape == (len(FRACTIONS), rows, chunks, k)
    assert len(embedder.calls) == 1 and len(embedder.calls[0]) == rows * chunks - 2
    assert (ids[:, 0, 1] == -1).all() and (np.delete(ids, 1, axis=2)[:, :1] >= 0).all()
    for f, subset in enumerate(sweep.subsets):
        assert np.isin(ids[f][ids[f] >= 0], subset.ids).all()
    np.testing.assert_array_equal(ids[:, 1, 0], ids[:, 2, 0])
    got = sweep.entries(ids[-1], tokens)
    assert got.shape == (rows, chunks, stored, 2 * M) and got.dtype == np.int32
    queries = tokens.reshape(rows, chunks, M)
    expected = neighbour_entries(database, ids[-1], queries, align=align)
    if not continuation:
        expected[..., M:] = PAD
    np.testing.assert_array_equal(got[:, :, :k], expected)
    assert (got[:, :, k:] == PAD).all() and (got[0, 1] == PAD).all()
    assert sweep.rows([1.0, 2.0, 3.0, 4.0], [None] * 4)[-1]["chunks"] == len(database)


def test_find_takes_the_keys_prepare_kept_and_embeds_only_the_rest(database, tmp_path):
    """prepare's neighbours stage keeps the eval chunks' keys (W/prepare/eval_query_keys.npz):
    the sweep embeds only the texts it does not find there, with the same neighbours, and
    ignores keys another embedder (BERT, length or dtype) made."""
    from retro_jax.retrieval.neighbours import QUERY_KEYS, load_query_keys, save_query_keys

    embedder = FakeEmbedder()
    embedder.model_id, embedder.max_len, embedder.dtype = "fake-bert", 64, "float32"
    keys = embedder.embed([f"db {i}" for i in range(len(database))])
    tokens = np.random.default_rng(3).integers(2, 60, (3, 5 * M)).astype(np.int32)

    def sweep(prepare_dir):
        return DatabaseSweep(
            database,
            keys,
            embedder,
            FakeTokenizer(),
            database_subsets(database, FRACTIONS),
            k=2,
            stored=4,
            prepare_dir=prepare_dir,
        )

    fresh = sweep("")
    want = fresh.find(tokens, progress=False)
    assert fresh.embedded == 15
    texts = [FakeTokenizer().decode(c) for c in tokens.reshape(15, M)]
    kept = dict(zip(texts[:10], embedder.embed(texts[:10])))
    save_query_keys(str(tmp_path / QUERY_KEYS), kept, embedder)
    assert sorted(load_query_keys(str(tmp_path / QUERY_KEYS), embedder)) == sorted(kept)
    reuse = sweep(str(tmp_path))
    embedder.calls.clear()
    np.testing.assert_array_equal(reuse.find(tokens, progress=False), want)
    assert reuse.embedded == 5 and sorted(embedder.calls[0]) == sorted(texts[10:])
    embedder.max_len = 32  # keys of another embedding are not used
    assert load_query_keys(str(tmp_path / QUERY_KEYS), embedder) == {}
    assert sweep(str(tmp_path)).find(tokens, progress=False).shape == want.shape
    embedder.max_len = 64
    assert not (tmp_path / (QUERY_KEYS + ".tmp")).exists()
