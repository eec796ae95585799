"""Neighbours: same-document exclusion (no training neighbour from the sequence's own document),
key reuse equals fresh embedding, missing neighbours are -1 / pad, records follow the schema."""

import zlib

import numpy as np

from retro_jax.data.records import RecordSpec, read_records
from retro_jax.data.sequences import write_sequences
from retro_jax.data.sources import Document
from retro_jax.retrieval import NeighbourIndex
from retro_jax.retrieval.chunks import ChunkDatabase, build_chunk_database, load_keys, write_keys
from retro_jax.retrieval.neighbours import (
    NeighbourFinder,
    select_neighbours,
    write_neighbour_shards,
)

PAD, EOS, M, N, K = 0, 1, 4, 16, 3


class Chars:
    pad_id, eos_id = PAD, EOS

    def document_tokens(self, text):
        ids = np.array([EOS] + [ord(c) for c in text] + [EOS], np.int32)
        return ids, np.array([0] + [1] * len(text) + [0], np.int32)

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i not in (PAD, EOS))


class TrigramEmbedder:
    """Hashed character-trigram counts: similar texts get near keys (a test double for BERT)."""

    dim, model_id = 64, "trigram-test"

    def __init__(self):
        self.texts = 0

    def embed(self, texts):
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for i in range(max(1, len(text) - 2)):
                out[row, zlib.crc32(text[i : i + 3].encode()) % self.dim] += 1
        return out


def test_select_neighbours_property():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q, kk, k = 7, 12, 3
        ids = rng.permutation(40)[:kk][None, :].repeat(q, 0)
        ids[rng.random((q, kk)) < 0.1] = -1
        docs = np.where(ids >= 0, ids % 5, -1)
        query_docs = rng.integers(0, 5, q)
        kept = select_neighbours(ids, docs, query_docs, k)
        for row in range(q):
            expected = [i for i in ids[row] if i >= 0 and i % 5 != query_docs[row]][:k]
            assert list(kept[row]) == expected + [-1] * (k - len(expected))
    assert (select_neighbours(ids, docs, None, 20)[:, 12:] == -1).all()


def _setup(tmp_path):
    phrases = [
        "the union is strong ",
        "taxes shall be low ",
        "peace and commerce ",
        "the army and the navy ",
        "roads canals and mails ",
    ]
    docs = [Document(10 + i, f"d{i}", p * (3 + i)) for i, p in enumerate(phrases)]
    tok, emb = Chars(), TrigramEmbedder()
    build_chunk_database(
        docs, tok, str(tmp_path / "db"), chunk_size=M, chunks_per_shard=16, progress=False
    )
    db = ChunkDatabase(str(tmp_path / "db"))
    (tmp_path / "keys").mkdir()
    write_keys(db, tok, emb, str(tmp_path / "keys"), progress=False)
    keys = load_keys(str(tmp_path / "keys"), db)
    index = NeighbourIndex.build(np.concatenate(keys), progress=False, model_id=emb.model_id)
    summaries = {
        split: write_sequences(
            docs[:3] if split == "train" else [Document(99, "e", "taxes shall")],
            tok,
            str(tmp_path / "seq"),
            split=split,
            seq_len=N,
            records_per_shard=4,
            progress=False,
        )
        for split in ("train", "eval")
    }
    return docs, tok, emb, db, keys, index, summaries


def test_training_neighbours_exclude_own_document(tmp_path):
    docs, tok, emb, db, keys, index, summaries = _setup(tmp_path)
    spec = RecordSpec(N, M, K)
    results = {}
    for exclude in (False, True):
        finder = NeighbourFinder(
            db,
            keys,
            index,
            emb,
            tok,
            num_neighbours=K,
            query_multiplier=8,
            exclude_same_document=exclude,
        )
        out = tmp_path / f"out{exclude}"
        out.mkdir()
        write_neighbour_shards(
            finder,
            "train",
            str(tmp_path / "seq"),
            summaries["train"],
            str(out),
            spec,
            progress=False,
        )
        files = sorted(p for p in out.iterdir())
        assert [p.name for p in files][-1].endswith(f"-of-{len(files):05d}.tfrecord")
        results[exclude] = [r for f in files for r in read_records(str(f), spec)]
    own = {
        e: sum(
            int(
                (
                    (db.doc_ids(r["neighbour_ids"]) == r["doc_id"][0]) & (r["neighbour_ids"] >= 0)
                ).sum()
            )
            for r in recs
        )
        for e, recs in results.items()
    }
    assert own[False] > 0  # repeated phrases: a document's own chunks are its nearest
    assert own[True] == 0
    for r in results[True]:
        ids = r["neighbour_ids"]
        np.testing.assert_array_equal(r["neighbours"], db.entries(ids))
        text = (r["tokens"][:N].reshape(-1, M) != PAD) & (r["tokens"][:N].reshape(-1, M) != EOS)
        assert ((ids >= 0).all(axis=1) == text.any(axis=1)).all()  # neighbours iff chunk has text
        assert (r["neighbours"][ids < 0] == PAD).all()


def test_query_keys_reuse_database_keys(tmp_path):
    docs, tok, emb, db, keys, index, summaries = _setup(tmp_path)
    finder = NeighbourFinder(db, keys, index, emb, tok, num_neighbours=K)
    doc_tokens, _ = tok.document_tokens(docs[1].text)
    chunks = np.stack([doc_tokens[u * M : (u + 1) * M] for u in (1, 2, 3)])
    emb.texts = 0
    reused = finder.query_keys(chunks, np.array([docs[1].doc_id] * 3), np.array([1, 2, 3]))
    assert emb.texts == 0 and finder.reused == 3
    fresh = emb.embed([tok.decode(c) for c in chunks])
    np.testing.assert_array_equal(reused, fresh)
    # not chunk-aligned, or another document: embedded afresh
    finder.query_keys(chunks, np.array([docs[2].doc_id] * 3), np.array([1, 2, 3]))
    assert finder.embedded == 3


def test_eval_neighbours_keep_same_document(tmp_path):
    docs, tok, emb, db, keys, index, summaries = _setup(tmp_path)
    finder = NeighbourFinder(db, keys, index, emb, tok, num_neighbours=K)
    (tmp_path / "out").mkdir()
    spec = RecordSpec(N, M, K)
    summary = write_neighbour_shards(
        finder,
        "eval",
        str(tmp_path / "seq"),
        summaries["eval"],
        str(tmp_path / "out"),
        spec,
        progress=False,
    )
    (record,) = read_records(str(tmp_path / "out" / summary["files"][0]), spec)
    first = record["neighbour_ids"][0, 0]  # "<EOS>tax" retrieves from the taxes document
    assert db.doc_ids(np.array([first]))[0] == 11
    assert record["loss_mask"].sum() == len("taxes shall") + 1  # + the final EOS
