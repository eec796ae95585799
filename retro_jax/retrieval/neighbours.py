"""Neighbours of every chunk of every sequence, written as the record shards training reads.

For a shard of sequences (tokens [S, n+1]) the l = n/m input chunks of each sequence are the
queries: [S, l, m] -> keys [S*l, D] (frozen BERT of the detokenized chunk; a training chunk that
is itself a database chunk reuses that chunk's stored key instead of running BERT again). The
index returns the nearest database chunks; for training sequences every chunk from the
sequence's own document is dropped (the paper's causality guard: chunk u must not retrieve chunk
u+1 of its own text), so K * query_multiplier are asked for and the first K that survive kept.
Chunks with no text (all EOS/padding) get no neighbours: ids -1, tokens pad_id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.data.records import RecordSpec, write_records
from retro_jax.data.sequences import read_sequence_shard
from retro_jax.retrieval.align import pick_neighbours
from retro_jax.retrieval.chunks import ChunkDatabase

# W/prepare/eval_query_keys.npz: the keys of the eval chunks the neighbours stage embedded, kept
# so that the eval's database sweep need not embed the same texts again. A cache, not one of the
# stage's outputs (not in its digest; the Beam driver does not write it): a reader embeds
# whatever it does not find there, and keys made by another embedding are not used.
QUERY_KEYS = "eval_query_keys.npz"


def _embedded_with(embedder) -> str:
    return f"{embedder.model_id} max_len={embedder.max_len} dtype={embedder.dtype}"


def save_query_keys(path: str, keys: dict[str, np.ndarray], embedder) -> None:
    """Write {text: key} and how the keys were embedded to `path` (an .npz), atomically."""
    texts = list(keys)
    with files.atomic_write(path) as f:
        np.savez(
            f,
            texts=np.array(texts, dtype=str),
            keys=np.stack([keys[t] for t in texts]).astype(np.float32),
            embedded_with=np.array(_embedded_with(embedder)),
        )


def load_query_keys(path: str, embedder) -> dict[str, np.ndarray]:
    """{text: key} saved at `path` by the same embedder (same BERT, length and dtype), else {}."""
    if not files.exists(path):
        return {}
    with files.load_npy(path) as saved:
        if str(saved["embedded_with"]) != _embedded_with(embedder):
            return {}
        return dict(zip(saved["texts"].tolist(), saved["keys"]))


def select_neighbours(
    ids: np.ndarray, neighbour_docs: np.ndarray, query_docs: np.ndarray | None, k: int
) -> np.ndarray:
    """Keep the first k found ids per query, skipping missing ones (-1) and, if query_docs is
    given, those from the query's own document.

    ids, neighbour_docs [Q, K'] (nearest first), query_docs [Q] -> ids int64 [Q, k], -1 padded.
    """
    valid = ids >= 0
    if query_docs is not None:
        valid &= neighbour_docs != query_docs[:, None]
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # valid ones first, order kept
    kept = np.take_along_axis(np.where(valid, ids, -1), order, axis=1)
    if kept.shape[1] < k:
        kept = np.concatenate([kept, np.full((len(ids), k - kept.shape[1]), -1, np.int64)], 1)
    return kept.astype(np.int64)


def chunk_has_text(chunks: np.ndarray, pad_id: int, eos_id: int) -> np.ndarray:
    """chunks [..., m] -> bool [...]: holds a token other than pad and EOS."""
    return ((chunks != pad_id) & (chunks != eos_id)).any(axis=-1)


class NeighbourFinder:
    """Queries of sequence shards -> neighbour ids and tokens, with key reuse and exclusion."""

    def __init__(
        self,
        database: ChunkDatabase,
        keys: list[np.ndarray],
        index,
        embedder,
        tokenizer,
        *,
        num_neighbours: int,
        query_multiplier: int = 4,
        exclude_same_document: bool = True,
        align: bool = False,
        rerank: int = 0,
    ):
        self.database = database
        self.keys = keys
        self.index = index
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.k = num_neighbours
        self.multiplier = max(1, int(query_multiplier))
        self.exclude = exclude_same_document
        self.align = align  # slide neighbour windows onto the query (retrieval/align.py)
        # > 0: keep the K of this many nearest candidates that overlap the query most
        self.rerank = max(0, int(rerank))
        self.embedded = self.reused = 0  # query keys computed / taken from the database
        self.fresh_keys: dict[str, np.ndarray] | None = None  # a dict: embedded texts' keys kept
        self.missing = 0  # neighbour slots left empty (-1) for chunks that have text

    def query_keys(self, chunks: np.ndarray, doc_ids: np.ndarray, chunk_index: np.ndarray):
        """Keys of query chunks. chunks [Q, m], doc_ids [Q], chunk_index [Q] (the chunk's index
        inside its document, -1 if not chunk-aligned) -> float32 [Q, D].

        A chunk equal to database chunk (first + chunk_index) of the same document reuses its
        key; the rest are detokenized and embedded.
        """
        m = self.database.chunk_size
        out = np.zeros((len(chunks), self.embedder.dim), np.float32)
        first, count = self.database.document_chunks(doc_ids)
        aligned = (first >= 0) & (chunk_index >= 0) & (chunk_index < count)
        candidate = np.where(aligned, first + chunk_index, -1)
        same = aligned & (self.database.entries(candidate)[:, :m] == chunks).all(axis=1)
        rows = np.flatnonzero(same)
        ids = candidate[rows]
        shard_of = ids // self.database.per_shard
        for shard in np.unique(shard_of):
            pick = shard_of == shard
            out[rows[pick]] = self.keys[shard][ids[pick] - shard * self.database.per_shard]
        fresh = np.flatnonzero(~same)
        if len(fresh):
            texts = [self.tokenizer.decode(chunks[i]) for i in fresh]
            out[fresh] = self.embedder.embed(texts)
            if self.fresh_keys is not None:
                self.fresh_keys.update(zip(texts, out[fresh]))
        self.reused += len(rows)
        self.embedded += len(fresh)
        return out

    def plan(self, sequences: dict[str, np.ndarray], split: str) -> dict:
        """The queries of one sequence shard: keys of its chunks that hold text.

        Returns live (flat chunk positions [Q] of the S*l chunks), queries [Q, D], query_docs
        ([Q] document ids to exclude, or None), ask (neighbours to request per query, K times
        query_multiplier when excluding) and the [S, l] shape.
        """
        tokens = sequences["tokens"]
        s, n = tokens.shape[0], tokens.shape[1] - 1
        m = self.database.chunk_size
        l = n // m  # noqa: E741 - the paper's name for chunks per sequence
        chunks = tokens[:, :n].reshape(s * l, m)
        seq_docs = np.repeat(sequences["doc_id"], l)  # [S*l]
        starts = sequences["offset"]
        aligned = (starts % m == 0)[:, None] & np.ones((1, l), bool)
        chunk_index = np.where(aligned, starts[:, None] // m + np.arange(l)[None, :], -1)
        live = np.flatnonzero(chunk_has_text(chunks, self.tokenizer.pad_id, self.tokenizer.eos_id))
        if not self.k:
            live = live[:0]
        queries = np.zeros((0, self.embedder.dim), np.float32)
        if len(live):
            queries = self.query_keys(chunks[live], seq_docs[live], chunk_index.reshape(-1)[live])
        exclude = self.exclude and split == "train"
        wanted = max(self.k, self.rerank)
        return dict(
            live=live,
            queries=queries,
            query_docs=seq_docs[live] if exclude else None,
            ask=min(wanted * self.multiplier if exclude else wanted, len(self.database)),
            shape=(s, l),
        )

    def choose(self, plan: dict, found: np.ndarray, found_docs: np.ndarray) -> np.ndarray:
        """Nearest-first candidates found [Q, ask] (and their document ids) -> neighbour ids
        int64 [S, l, K], -1 where none; with `rerank` the first `rerank` candidates [S, l, C]
        (`retrieval.align.rerank` keeps K of them)."""
        ids, missing = choose_neighbours(plan, found, found_docs, self.k)
        self.missing += missing  # the same for the K a reranking keeps
        if self.rerank:
            ids, _ = choose_neighbours(plan, found, found_docs, self.rerank)
        return ids

    def shard_examples(self, sequences: dict[str, np.ndarray], split: str) -> list[dict]:
        """Records of one sequence shard (see retro_jax.data.records for the schema)."""
        plan = self.plan(sequences, split)
        found = np.zeros((0, plan["ask"]), np.int64)
        if len(plan["live"]):
            found, _ = self.index.search(plan["queries"], plan["ask"])
        ids = self.choose(plan, found, self.database.doc_ids(found))
        queries = query_chunks(sequences, ids)
        ids, entries, _ = pick_neighbours(
            self.database, ids, queries, self.k, align=self.align, by_overlap=bool(self.rerank)
        )
        return shard_records(sequences, ids, entries)


def query_chunks(sequences: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The input chunks int32 [S, l, m] of a sequence shard whose neighbour ids are [S, l, K]."""
    s, l = ids.shape[:2]  # noqa: E741
    n = sequences["tokens"].shape[1] - 1
    return sequences["tokens"][:, :n].reshape(s, l, n // l)


def choose_neighbours(plan: dict, found, found_docs, k: int) -> tuple[np.ndarray, int]:
    """(`NeighbourFinder.choose`'s ids [S, l, K], empty slots of chunks with text)."""
    s, l = plan["shape"]  # noqa: E741
    ids = np.full((s * l, k), -1, np.int64)
    if not len(plan["live"]):
        return ids.reshape(s, l, k), 0
    kept = select_neighbours(found, found_docs, plan["query_docs"], k)
    ids[plan["live"]] = kept
    return ids.reshape(s, l, k), int((kept < 0).sum())


def shard_records(
    sequences: dict[str, np.ndarray], ids: np.ndarray, entries: np.ndarray
) -> list[dict]:
    """One record per sequence: ids [S, l, K] and their entries [S, l, K, 2m]."""
    return [
        {
            "tokens": sequences["tokens"][i],
            "loss_mask": sequences["loss_mask"][i],
            "target_bytes": sequences["target_bytes"][i],
            "neighbours": entries[i],
            "neighbour_ids": ids[i],
            "doc_id": sequences["doc_id"][i : i + 1],
            "offset": sequences["offset"][i : i + 1],
        }
        for i in range(len(ids))
    ]


def record_file_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def write_neighbour_shards(
    finder: NeighbourFinder,
    split: str,
    sequence_dir: str,
    sequence_summary: dict,
    out_dir: str,
    spec: RecordSpec,
    *,
    done: set[str] = frozenset(),
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
) -> dict:
    """One TFRecord file per sequence shard: out_dir/{split}-NNNNN-of-MMMMM.tfrecord.

    Files named in `done` (finished by an interrupted run of the same settings) are kept;
    `on_shard(file name)` is called after each new file is complete.
    """
    shards = sequence_summary["shards"]
    queries = 0
    start = time.time()
    bar = tqdm(
        total=sum(sh["sequences"] for sh in shards),
        desc=f"neighbours {split}",
        unit="seq",
        disable=not progress,
    )
    for index, shard in enumerate(shards):
        name = record_file_name(split, index, len(shards))
        if name in done and files.exists(os.path.join(out_dir, name)):
            bar.update(shard["sequences"])
            continue
        sequences = read_sequence_shard(os.path.join(sequence_dir, shard["name"]))
        examples = finder.shard_examples(sequences, split)
        queries += len(examples) * spec.num_chunks
        write_records(os.path.join(out_dir, name), examples, spec=spec)
        bar.update(shard["sequences"])
        if on_shard is not None:
            on_shard(name)
    bar.close()
    seconds = time.time() - start
    return dict(
        split_summary(split, sequence_summary, spec),
        run=dict(queries=queries, seconds=round(seconds, 3)),
    )


def split_summary(split: str, sequence_summary: dict, spec: RecordSpec) -> dict:
    """records.json's entry of a split: its files, records and scored tokens and bytes."""
    shards = sequence_summary["shards"]
    records = sum(sh["sequences"] for sh in shards)
    return dict(
        files=[record_file_name(split, i, len(shards)) for i in range(len(shards))],
        records=records,
        scored_tokens=sum(sh["scored_tokens"] for sh in shards),
        scored_bytes=sum(sh["scored_bytes"] for sh in shards),
        queries=records * spec.num_chunks,
    )
