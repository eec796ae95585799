"""Live retrieval while sampling: a complete chunk's text -> its neighbours in the database.

`LiveRetriever` embeds a chunk with the frozen BERT that keyed the database, searches the saved
index and reads the neighbours' chunk + continuation tokens, aligned and reranked as prepare did.
`RetrievedChunk` records what each chunk retrieved (ids, distances, texts, documents, and how
much of the next chunk was copied from each neighbour: `copied_tokens`); `format_neighbours`
prints it, as `retro-jax sample --show-neighbours` and the demo do.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from itertools import zip_longest

import numpy as np

from retro_jax.leakage import longest_common_run
from retro_jax.retrieval.align import pick_neighbours

# A generated chunk that shares a run of at least this many tokens with one of the neighbours it
# was conditioned on is shown as copied from it (format_neighbours' `min_copied`).
MIN_COPIED = 8


@dataclasses.dataclass
class RetrievedChunk:
    """One complete chunk of the sequence and what it retrieved (it conditions chunk + 1)."""

    chunk: int  # index of the chunk in the (padded) sequence
    text: str  # the chunk's text: the query
    source: str  # "prompt", "generated" or "prompt+generated"
    ids: np.ndarray  # int64 [k] database chunk ids, -1 where missing
    distances: np.ndarray  # float32 [k] squared L2 between the keys
    tokens: np.ndarray  # int32 [k, 2m] the neighbours as the encoder sees them
    neighbour_texts: list[str]  # each neighbour's chunk text
    continuation_texts: list[str]  # each neighbour's continuation text
    # Each neighbour's source document, by key (ChunkDatabase.document_key: "doc <id>" for a
    # database built without doc_keys.json; "" where no neighbour); None: not recorded.
    documents: list[str] | None = None
    # Per neighbour: the longest run of consecutive generated tokens of the next chunk (the one
    # these neighbours condition; after the last chunk, what was generated after it) that its
    # entry (chunk + continuation, as the encoder saw it) also holds (`copied_tokens`); None:
    # not recorded.
    copied: list[int] | None = None

    def to_json(self) -> dict:
        """The chunk and, per neighbour, its id, distance, texts, document and copied run (id -1:
        none; no tokens)."""
        rows = []
        for j, (i, d, t, c) in enumerate(
            zip(self.ids, self.distances, self.neighbour_texts, self.continuation_texts)
        ):
            row = {
                "id": int(i),
                "distance": float(d) if i >= 0 else None,
                "text": t,
                "continuation": c,
            }
            if self.documents is not None:
                row["document"] = self.documents[j]
            if self.copied is not None:
                row["copied"] = int(self.copied[j])
            rows.append(row)
        return {
            "chunk": int(self.chunk),
            "source": self.source,
            "text": self.text,
            "neighbours": rows,
        }

    @classmethod
    def from_json(cls, value: dict) -> RetrievedChunk:
        """The inverse of to_json (tokens: None; documents / copied None when not stored, as in
        files written before they were)."""
        rows = value["neighbours"]
        has = lambda name: bool(rows) and all(name in n for n in rows)
        return cls(
            chunk=value["chunk"],
            text=value["text"],
            source=value["source"],
            ids=np.array([n["id"] for n in rows], np.int64),
            distances=np.array([np.inf if n["distance"] is None else n["distance"] for n in rows]),
            tokens=None,
            neighbour_texts=[n["text"] for n in rows],
            continuation_texts=[n["continuation"] for n in rows],
            documents=[n["document"] for n in rows] if has("document") else None,
            copied=[int(n["copied"]) for n in rows] if has("copied") else None,
        )


def copied_tokens(generated: np.ndarray, entries: np.ndarray, pad_id: int) -> np.ndarray:
    """generated int [g] (tokens generated while some neighbours conditioned them), entries int
    [k, 2m] (those neighbours: chunk + continuation) -> int32 [k]: the longest run of
    consecutive tokens of `generated` that each entry also holds (leakage's s(C), one run per
    neighbour; a run may go on from the chunk into its continuation). Padding never matches."""
    entries = np.asarray(entries)
    generated = np.asarray(generated).reshape(-1)
    if entries.ndim != 2 or not len(entries) or not len(generated):
        return np.zeros(len(entries), np.int32)
    ours = np.where(generated == pad_id, -1, generated).astype(np.int64)
    theirs = np.where(entries == pad_id, -2, entries).astype(np.int64)
    return longest_common_run(np.broadcast_to(ours, (len(theirs), len(ours))), theirs)


class LiveRetriever:
    """A chunk's tokens [m] -> its k nearest database entries (chunk + continuation) [k, 2m]."""

    def __init__(
        self,
        tokenizer,
        embedder,
        index,
        database,
        num_neighbours: int,
        *,
        continuation=True,
        align=False,
        rerank=0,
    ):
        self.tokenizer, self.embedder, self.index = tokenizer, embedder, index
        self.database, self.k = database, int(num_neighbours)
        # as prepare aligned and ranked the records (retrieval.align_neighbours, .rerank)
        self.align, self.rerank = bool(align), int(rerank)
        # False: the continuation half of each entry is padding, as the model was trained
        # (data.neighbour_continuation, the paper's ablation).
        self.continuation = bool(continuation)
        self.seconds = {"embed": 0.0, "search": 0.0, "lookup": 0.0}
        self.queries = 0

    def __call__(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (entries int32 [k, 2m], ids int64 [k], distances float32 [k])."""
        entries, ids, distances = self.batch(np.asarray(chunk)[None])
        return entries[0], ids[0], distances[0]

    def batch(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """chunks [N, m] -> (entries int32 [N, k, 2m], ids int64 [N, k], distances float32
        [N, k]): one BERT call and one search for all N.

        A chunk without text (only padding and EOS) retrieves nothing, as in prepare."""
        chunks = np.asarray(chunks)
        count, m = chunks.shape
        text = ((chunks != self.tokenizer.pad_id) & (chunks != self.tokenizer.eos_id)).any(1)
        wanted = max(self.k, self.rerank)  # candidates searched
        ids = np.full((count, wanted), -1, np.int64)
        distances = np.full((count, wanted), np.inf, np.float32)
        start = embedded = searched = time.perf_counter()
        if text.any():
            queries = [self.tokenizer.decode(chunk) for chunk in chunks[text]]
            keys = self.embedder.embed(queries, progress=False)  # [Q, D]
            embedded = time.perf_counter()
            ids[text], distances[text] = self.index.search(keys, wanted)
            searched = time.perf_counter()
            self.queries += len(queries)
        ids, entries, order = pick_neighbours(  # [N, k], [N, k, 2m], [N, k]
            self.database, ids, chunks, self.k, align=self.align, by_overlap=bool(self.rerank)
        )
        distances = np.take_along_axis(distances, order, axis=1)
        if not self.continuation:
            entries[..., m:] = self.tokenizer.pad_id
        done = time.perf_counter()
        self.seconds["embed"] += embedded - start
        self.seconds["search"] += searched - embedded
        self.seconds["lookup"] += done - searched
        return entries, ids, distances


def format_neighbours(
    chunks: list[RetrievedChunk], width: int = 100, min_copied: int = MIN_COPIED
) -> str:
    """Per chunk: its text on the left, the database chunks it retrieved on the right, each
    with its source document, then a line `next chunk copied N tokens from [j] DOCUMENT` for
    each neighbour the next chunk shares a run of at least `min_copied` generated tokens with
    (RetrievedChunk.copied)."""
    half = max(20, (width - 3) // 2)
    blocks = []
    for chunk in chunks:
        left = textwrap.wrap(repr(chunk.text), half) or [""]
        right, copies = [], []
        for j, (i, d, text, cont) in enumerate(
            zip(chunk.ids, chunk.distances, chunk.neighbour_texts, chunk.continuation_texts)
        ):
            if i < 0:
                right.append(f"[{j}] (none)")
                continue
            document = f"#{i}" if chunk.documents is None else chunk.documents[j]
            where = "" if chunk.documents is None else f" ({document})"
            right += textwrap.wrap(f"[{j}] #{i} d={d:.3f}{where} {text!r} + {cont!r}", half)
            if chunk.copied is not None and chunk.copied[j] >= max(1, min_copied):
                line = f"next chunk copied {chunk.copied[j]} tokens from [{j}] {document}"
                copies += textwrap.wrap(line, half)
        right += copies
        title = f"chunk {chunk.chunk} ({chunk.source})"
        lines = [f"{title:-<{half}}-+-{'retrieved (conditions the next chunk)':-<{half}}"]
        lines += [f"{a:<{half}} | {b}" for a, b in zip_longest(left, right, fillvalue="")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
