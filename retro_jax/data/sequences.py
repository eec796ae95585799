"""Cutting documents into sequences of n tokens: the training and the evaluation layouts.

A document is [EOS] + tokens + [EOS] (length L); target i of a sequence starting at s is token
s + i + 1. Every target of a document (tokens 1 .. L-1) is scored exactly once:

- training: consecutive sequences of n + 1 tokens that share one token, starting at 0, n, 2n,
  ... (so chunk u of a sequence is chunk s/m + u of the document, the database's chunking);
- evaluation: windows of n with stride n/2; the first window scores all its targets, every
  later one only its second half, so each token is scored once with at least n/2 of context.

Sequences are written in shards of `records_per_shard` (npz: tokens [S, n+1], loss_mask [S, n],
target_bytes [S, n], doc_id [S], offset [S]) so later stages stream them shard by shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError

FIELDS = ("tokens", "loss_mask", "target_bytes", "doc_id", "offset")


def sequence_starts(length: int, seq_len: int, split: str) -> list[tuple[int, int]]:
    """(start, first scored target position) of each sequence of a document of `length` tokens.

    Train: starts 0, n, 2n, ... scoring from position 0. Eval: starts 0, n/2, n, ...; window 0
    scores from 0, later windows from n/2 (their first half was scored by the previous one).
    """
    n = seq_len
    targets = length - 1  # tokens 1 .. length-1 are predicted
    if targets <= 0:
        return []
    if split == "train":
        return [(s, 0) for s in range(0, targets, n)]
    if split != "eval":
        raise ValueError(f"split must be train or eval, got {split!r}")
    half = n // 2
    windows = [(0, 0)]
    start = half
    while start + half < targets:  # targets start+half+1 .. start+n still unscored
        windows.append((start, half))
        start += half
    return windows


def cut_document(
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    doc_id: int,
    seq_len: int,
    pad_id: int,
    split: str,
) -> dict[str, np.ndarray]:
    """Sequences of one document. tokens, token_bytes [L] -> tokens [S, n+1], loss_mask [S, n],
    target_bytes [S, n], doc_id [S], offset [S] (token offset of each sequence's first token)."""
    n = seq_len
    starts = sequence_starts(len(tokens), n, split)
    count = len(starts)
    out = {
        "tokens": np.full((count, n + 1), pad_id, np.int32),
        "loss_mask": np.zeros((count, n), np.int8),
        "target_bytes": np.zeros((count, n), np.int32),
        "doc_id": np.full(count, doc_id, np.int64),
        "offset": np.array([s for s, _ in starts], np.int64),
    }
    for row, (start, first_scored) in enumerate(starts):
        piece = tokens[start : start + n + 1]
        out["tokens"][row, : len(piece)] = piece
        targets = len(piece) - 1  # real targets in this window
        out["loss_mask"][row, first_scored:targets] = 1
        out["target_bytes"][row, :targets] = token_bytes[start + 1 : start + 1 + targets]
    out["target_bytes"] *= out["loss_mask"]  # bytes only where scored, so sums count once
    return out


class SequenceShardWriter:
    """Buffers sequences and writes `prefix-NNNNN.npz` shards of `per_shard` rows."""

    def __init__(self, directory: str, prefix: str, per_shard: int):
        if per_shard <= 0:
            raise RetroError(f"data.records_per_shard={per_shard} must be positive")
        self.directory, self.prefix, self.per_shard = directory, prefix, per_shard
        files.makedirs(directory)
        self.buffer: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, sequences: dict[str, np.ndarray]) -> None:
        for key in FIELDS:
            self.buffer[key].append(sequences[key])
        self.buffered += len(sequences["doc_id"])
        while self.buffered >= self.per_shard:
            self._flush(self.per_shard)

    def close(self) -> list[dict]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards

    def _flush(self, rows: int) -> None:
        joined = {k: np.concatenate(v) for k, v in self.buffer.items()}
        head = {k: v[:rows] for k, v in joined.items()}
        self.shards.append(
            write_sequence_shard(self.directory, self.prefix, len(self.shards), head)
        )
        self.buffer = {k: [v[rows:]] for k, v in joined.items()}
        self.buffered -= rows


def write_sequence_shard(directory: str, prefix: str, index: int, rows: dict) -> dict:
    """`prefix-NNNNN.npz` of the FIELDS arrays (temporary name, rename); returns its summary
    {name, sequences, scored_tokens, scored_bytes}."""
    name = f"{prefix}-{index:05d}.npz"
    path = os.path.join(directory, name)
    with files.atomic_write(path) as f:
        np.savez(f, **{k: rows[k] for k in FIELDS})
    return dict(
        name=name,
        sequences=len(rows["doc_id"]),
        scored_tokens=int(rows["loss_mask"].sum()),
        scored_bytes=int(rows["target_bytes"].sum()),
    )


def write_sequences(
    documents: Iterable,
    tokenizer,
    directory: str,
    *,
    split: str,
    seq_len: int,
    records_per_shard: int,
    progress: bool = True,
) -> dict:
    """Tokenize documents, cut them (train or eval layout) and write shards to `directory`.

    Returns {split, shards: [{name, sequences, scored_tokens, scored_bytes}], documents,
    tokens, bytes}.
    """
    if seq_len % 2:
        raise RetroError(f"data.seq_len={seq_len} must be even (evaluation stride is n/2)")
    writer = SequenceShardWriter(directory, split, records_per_shard)
    documents_seen = tokens_seen = bytes_seen = 0
    for doc in tqdm(documents, desc=f"sequences {split}", unit="doc", disable=not progress):
        ids, counts = tokenizer.document_tokens(doc.text)
        writer.add(
            cut_document(
                ids,
                counts,
                doc_id=doc.doc_id,
                seq_len=seq_len,
                pad_id=tokenizer.pad_id,
                split=split,
            )
        )
        documents_seen += 1
        tokens_seen += len(ids)
        bytes_seen += int(counts.sum())
    shards = writer.close()
    return dict(
        split=split,
        shards=shards,
        documents=documents_seen,
        tokens=tokens_seen,
        bytes=bytes_seen,
    )


def read_sequence_shard(path: str) -> dict[str, np.ndarray]:
    with files.load_npy(path, mmap=False) as data:
        return {k: data[k] for k in FIELDS}


def write_summary(directory: str, name: str, summary: dict) -> None:
    files.write_json(os.path.join(directory, name), summary, indent=1)
