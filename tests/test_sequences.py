"""Sequence layouts: training sequences share one token, evaluation windows (stride n/2) score
every token of a document exactly once, and the scored bytes sum to the document's bytes."""

import numpy as np
import pytest

from retro_jax.data.sequences import (
    cut_document,
    read_sequence_shard,
    sequence_starts,
    write_sequences,
)
from retro_jax.data.sources import Document


def _scored_targets(cut):
    """absolute target position -> (token, bytes), asserting each is scored at most once."""
    scored = {}
    for row in range(len(cut["doc_id"])):
        for i in np.flatnonzero(cut["loss_mask"][row]):
            t = int(cut["offset"][row]) + i + 1
            assert t not in scored, f"token {t} scored twice"
            scored[t] = (int(cut["tokens"][row, i + 1]), int(cut["target_bytes"][row, i]))
    return scored


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("length", [1, 2, 3, 8, 9, 10, 17, 31, 32, 33, 40, 100])
def test_every_token_scored_exactly_once(split, length):
    n = 8
    tokens = np.arange(1, length + 1, dtype=np.int32) + 10
    token_bytes = np.arange(length, dtype=np.int32) % 3 + 1
    cut = cut_document(tokens, token_bytes, doc_id=7, seq_len=n, pad_id=0, split=split)
    scored = _scored_targets(cut)
    assert sorted(scored) == list(range(1, length))  # every target but the first token
    assert all(scored[t] == (tokens[t], token_bytes[t]) for t in scored)
    assert cut["target_bytes"].sum() == token_bytes[1:].sum()
    assert cut["tokens"].shape == (len(cut["offset"]), n + 1) and (cut["doc_id"] == 7).all()
    real = np.arange(n + 1)[None, :] + cut["offset"][:, None] < length
    assert (cut["tokens"][~real] == 0).all()  # padded with pad_id after the document's end
    assert not (cut["loss_mask"] & ~real[:, 1:]).any()  # padding never scored


def test_layouts():
    assert sequence_starts(20, 8, "train") == [(0, 0), (8, 0), (16, 0)]
    # eval: stride n/2, later windows score only their second half, context >= n/2
    assert sequence_starts(20, 8, "eval") == [(0, 0), (4, 4), (8, 4), (12, 4)]
    assert sequence_starts(9, 8, "eval") == [(0, 0)]
    assert sequence_starts(1, 8, "train") == []
    cut = cut_document(
        np.arange(17), np.ones(17, np.int32), doc_id=1, seq_len=8, pad_id=0, split="train"
    )
    # consecutive training sequences share one token: the last target is the next input
    assert cut["tokens"][0, -1] == cut["tokens"][1, 0] == 8


def test_sequence_shards(tmp_path):
    class Chars:  # a tokenizer of characters, EOS = 1, pad = 0
        pad_id, eos_id = 0, 1

        def document_tokens(self, text):
            ids = np.array([1] + [ord(c) for c in text] + [1], np.int32)
            counts = np.array([0] + [len(c.encode()) for c in text] + [0], np.int32)
            return ids, counts

    docs = [Document(i, f"d{i}", "é" * (5 + 7 * i)) for i in range(6)]
    summary = write_sequences(
        docs, Chars(), str(tmp_path), split="eval", seq_len=8, records_per_shard=5, progress=False
    )
    shards = [read_sequence_shard(str(tmp_path / sh["name"])) for sh in summary["shards"]]
    sizes = [len(s["doc_id"]) for s in shards]
    assert sizes[:-1] == [5] * (len(sizes) - 1) and 0 < sizes[-1] <= 5
    assert sum(sizes) == sum(sh["sequences"] for sh in summary["shards"])
    assert sum(sh["scored_bytes"] for sh in summary["shards"]) == summary["bytes"]
    assert summary["bytes"] == sum(len(d.text.encode()) for d in docs)
    doc_ids = np.concatenate([s["doc_id"] for s in shards])
    assert (np.diff(doc_ids) >= 0).all() and set(doc_ids) == set(range(6))
