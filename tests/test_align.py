"""Neighbour alignment (retrieval.align_neighbours): a neighbour window slides inside its own
document to where it best overlaps the query chunk, never across documents, and reads nothing
but the query chunk (properties over random documents, shifts and seeds)."""

import numpy as np
import pytest

from retro_jax.data.sources import Document
from retro_jax.retrieval.align import (
    align_entries,
    best_shifts,
    neighbour_entries,
    neighbour_windows,
)
from retro_jax.retrieval.chunks import ChunkDatabase, build_chunk_database
from retro_jax.retrieval.neighbours import query_chunks

PAD, EOS, M = 0, 1, 8


class Ids:
    """A tokenizer of whitespace-separated integers (>= 2), EOS = 1, pad = 0."""

    pad_id, eos_id = PAD, EOS

    def document_tokens(self, text):
        ids = np.array([EOS] + [int(w) for w in text.split()] + [EOS], np.int32)
        return ids, np.ones(len(ids), np.int32)


def _database(tmp_path, docs: list[np.ndarray], per_shard: int = 5) -> ChunkDatabase:
    documents = [
        Document(i + 1, f"doc{i}", " ".join(str(t) for t in doc)) for i, doc in enumerate(docs)
    ]
    folder = str(tmp_path / "db")
    build_chunk_database(
        documents, Ids(), folder, chunk_size=M, chunks_per_shard=per_shard, progress=False
    )
    return ChunkDatabase(folder)


@pytest.mark.parametrize("seed", range(3))
def test_a_shifted_copy_is_found_at_its_offset(seed):
    """A query that is the document's text shifted by s recovers s and the window [N, F] that
    starts there, for every s in [-(m-1), m-1]; the same query with half its tokens replaced by
    padding still does (padding never matches)."""
    rng = np.random.default_rng(seed)
    doc = rng.integers(2, 1000, 6 * M)
    p = 2  # the retrieved chunk
    window = doc[(p - 1) * M : (p + 3) * M]
    for s in range(-(M - 1), M):
        query = doc[p * M + s : p * M + s + M].copy()
        assert best_shifts(window[None], query[None], PAD)[0][0] == s
        query[rng.permutation(M)[: M // 2]] = PAD
        assert best_shifts(window[None], query[None], PAD)[0][0] == s
        entry = align_entries(window[None, None], query[None], PAD)[0, 0]
        np.testing.assert_array_equal(entry, doc[p * M + s : p * M + s + 2 * M])


def test_no_overlap_keeps_the_stored_entry():
    """A query sharing no token with the window (or only padding) keeps shift 0: the entry as
    stored."""
    window = np.arange(2, 2 + 4 * M)[None]
    unrelated = np.full((1, M), 5000)
    assert best_shifts(window, unrelated, PAD)[0][0] == 0
    padding_only = np.zeros((1, 4 * M), int)
    assert best_shifts(padding_only, np.zeros((1, M), int), PAD)[0][0] == 0
    entry = align_entries(window[:, None], unrelated, PAD)[0, 0]
    np.testing.assert_array_equal(entry, window[0, M : 3 * M])


def test_windows_stay_inside_the_document(tmp_path):
    """The window of a document's first chunk has padding before it, of its last chunk padding
    after; ids -1 give padding; windows cross shard boundaries inside a document."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, 1000, 3 * M + 3), rng.integers(2, 1000, 5 * M)
    db = _database(tmp_path, [a, b], per_shard=3)
    first, count = db.document_chunks(np.array([1, 2]))
    tokens = [np.concatenate([[EOS], a, [EOS]]), np.concatenate([[EOS], b, [EOS]])]
    for doc, start, n in zip(tokens, first, count):
        padded = np.concatenate([np.full(M, PAD), doc, np.full(4 * M, PAD)])
        for u in range(n):
            window = neighbour_windows(db, np.array([start + u]))[0]
            np.testing.assert_array_equal(window, padded[u * M : u * M + 4 * M])
    assert (neighbour_windows(db, np.array([-1])) == PAD).all()


def test_entries_without_alignment_are_the_stored_ones(tmp_path):
    rng = np.random.default_rng(1)
    db = _database(tmp_path, [rng.integers(2, 1000, 4 * M) for _ in range(3)])
    ids = np.array([[0, 3], [-1, 5]])
    queries = rng.integers(2, 1000, (2, M))
    np.testing.assert_array_equal(neighbour_entries(db, ids, queries, False), db.entries(ids))


def test_alignment_reads_only_the_retrieving_chunk(tmp_path):
    """Chunk u's aligned neighbours are a function of chunk u's tokens and the ids alone:
    changing any other chunk of the sequence (its future included) changes none of them."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(2, 50, 6 * M) for _ in range(4)]  # a small alphabet: many matches
    db = _database(tmp_path, docs)
    s, l, k = 2, 4, 3  # noqa: E741 - the paper's name for chunks per sequence
    tokens = rng.integers(2, 50, (s, l * M + 1))
    ids = rng.integers(-1, len(db), (s, l, k))
    before = neighbour_entries(db, ids, query_chunks({"tokens": tokens}, ids), True)
    for u in range(l):
        changed = tokens.copy()
        other = np.r_[0 : u * M, (u + 1) * M : l * M + 1]
        changed[:, other] = rng.integers(2, 50, (s, len(other)))
        after = neighbour_entries(db, ids, query_chunks({"tokens": changed}, ids), True)
        np.testing.assert_array_equal(after[:, u], before[:, u])


def test_live_retrieval_aligns_and_reranks_as_prepare(tmp_path):
    """`retro-jax sample`'s LiveRetriever keeps, of the index's candidates, the ones `rerank`
    keeps (with their distances) and aligns them as prepare's records are aligned."""
    from retro_jax.retrieval.align import rerank
    from retro_jax.sample.live import LiveRetriever

    rng = np.random.default_rng(3)
    docs = [rng.integers(2, 1000, 5 * M) for _ in range(4)]
    db = _database(tmp_path, docs)
    first, _ = db.document_chunks(np.array([3]))
    query = docs[2][M + 3 : 2 * M + 3]  # doc 3's text, 3 tokens into its second chunk
    candidates = np.array([[0, 1, first[0] + 1, 5, 7]])  # the copy is BERT's third choice

    class Index:
        def search(self, keys, k):
            assert k == candidates.shape[1]
            return candidates[:, :k], np.arange(k, dtype=np.float32)[None] + 0.5

    class Tokens(Ids):
        def decode(self, ids):
            return " ".join(map(str, ids))

    class Embedder:
        def embed(self, texts, progress=False):
            return np.zeros((len(texts), 2), np.float32)

    live = LiveRetriever(Tokens(), Embedder(), Index(), db, 2, align=True, rerank=5)
    entries, ids, distances = live(query)
    want_ids, want_entries, _ = rerank(
        candidates, neighbour_windows(db, candidates), query[None], 2, PAD, True
    )
    assert ids[0] == first[0] + 1 and distances[0] == 2.5
    np.testing.assert_array_equal(ids, want_ids[0])
    np.testing.assert_array_equal(entries, want_entries[0])
    # (a document starts with EOS: its token i sits at position i + 1)
    np.testing.assert_array_equal(entries[0], docs[2][M + 3 : 3 * M + 3])  # the aligned copy
