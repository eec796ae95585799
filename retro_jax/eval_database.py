"""The paper's database-size claim at evaluation: one trained RETRO scored against nested subsets
of its chunk database (`eval.database_fractions`, e.g. 1/8, 1/4, 1/2 and all of the chunks).

Subsets: the documents of W/prepare/db in the order of their stable doc_id (a hash of where each
comes from, so the order owes nothing to the source's), taken until their chunks reach f * N
(N = the database's chunks). A subset is whole documents, a prefix of one fixed order, so the
subsets of growing fractions are nested (1/8 in 1/4 in 1/2 in all) and f = 1 is the database.

Queries: the evaluation chunks that hold text (not only pad/EOS), detokenized and embedded once
with the frozen BERT prepare used (retrieval.bert_path; max_len and dtype of the keys stage in
W/prepare/manifest.json), reused for every fraction. Chunks without text get no neighbours
(ids -1, entries of pad_id), as in prepare.

Search: the k nearest keys of the subset by exact squared L2 (`NeighbourIndex` exact shards over
W/prepare/keys rows, in chunk-id order, so at f = 1 ties break as in a brute-force prepared
index); k = eval.num_neighbours. Entries: `retrieval.align.neighbour_entries(database, ids,
chunks, align=retrieval.align_neighbours)`, what prepare writes; continuations blanked with
pad_id when data.neighbour_continuation is False, as the eval batches are.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError
from retro_jax.retrieval.align import neighbour_entries, neighbour_windows, rerank


@dataclasses.dataclass(frozen=True)
class Subset:
    """A database restricted to whole documents: `ids` int64 [S] (sorted global chunk ids)."""

    fraction: float
    ids: np.ndarray
    documents: int
    tokens: int  # non-padding tokens of the chunks (each database token counted once)

    @property
    def chunks(self) -> int:
        return len(self.ids)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """eval.database_fractions -> the distinct fractions, ascending; a RetroError for one
    outside (0, 1]."""
    values = tuple(float(f) for f in (fractions or ()))
    bad = [f for f in values if not 0.0 < f <= 1.0]
    if bad:
        raise RetroError(
            f"eval.database_fractions={tuple(values)}: {bad[0]} is outside (0, 1] (fractions of "
            "the database's chunks)"
        )
    return tuple(sorted(set(values)))


def chunk_tokens(database) -> np.ndarray:
    """Non-padding tokens of every database chunk (its first m tokens): int64 [N]."""
    m, pad = database.chunk_size, database.pad_id
    return np.concatenate(
        [
            (np.asarray(database.shard_tokens(i))[:, :m] != pad).sum(axis=1)
            for i in range(database.num_shards)
        ]
    ).astype(np.int64)


def database_subsets(database, fractions: Sequence[float]) -> list[Subset]:
    """One Subset per fraction f (checked, ascending): the fewest documents, in doc_id order,
    whose chunks reach f * N. Nested; f = 1 is every chunk."""
    fractions = check_fractions(fractions)
    table = np.asarray(database.docs, np.int64)  # (doc_id, first chunk, count) by doc_id
    total = int(table[:, 2].sum())
    reach = np.cumsum(table[:, 2])
    per_chunk = chunk_tokens(database)
    subsets = []
    for f in fractions:
        docs = min(len(table), int(np.searchsorted(reach, f * total - 1e-9, side="left")) + 1)
        ids = np.sort(
            np.concatenate([np.arange(a, a + c, dtype=np.int64) for _, a, c in table[:docs]])
        )
        subsets.append(Subset(f, ids, docs, int(per_chunk[ids].sum())))
    return subsets


def exact_neighbours(keys: np.ndarray, subset: Subset, queries: np.ndarray, k: int) -> np.ndarray:
    """keys float32 [N, D] of the whole database, queries [Q, D] -> the global chunk ids int64
    [Q, k] of the k nearest (squared L2) keys of the subset, nearest first; -1 where the subset
    has fewer than k chunks."""
    from retro_jax.retrieval.index import NeighbourIndex

    if not len(queries):
        return np.zeros((0, k), np.int64)
    part = keys[subset.ids]
    index = NeighbourIndex.build(
        part, brute_force_below=len(part) + 1, shard_size=len(part), progress=False
    )
    rows, _ = index.search(queries, k)
    return np.where(rows >= 0, subset.ids[np.maximum(rows, 0)], -1)


class DatabaseSweep:
    """Neighbours of the evaluation chunks in each subset of the database (module docstring).

    `find(tokens)` embeds and searches once for all of this host's rows; `entries(ids, tokens)`
    turns one batch's ids into the [B, l, K, 2m] neighbours the eval batches carry."""

    def __init__(
        self,
        database,
        keys: np.ndarray,
        embedder,
        tokenizer,
        subsets: list[Subset],
        *,
        k: int,
        stored: int,
        align: bool = False,
        rerank: int = 0,
        continuation: bool = True,
        prepare_dir: str = "",
    ):
        self.database, self.keys, self.subsets = database, keys, subsets
        self.prepare_dir = prepare_dir  # where prepare kept the eval chunks' keys, if it did
        self.embedded = 0  # query keys the last `find` computed
        self.embedder, self.tokenizer = embedder, tokenizer
        self.k, self.stored = int(k), int(stored)
        self.align, self.continuation = bool(align), bool(continuation)
        self.rerank = int(rerank)  # candidates ranked by overlap, as prepare did (0: none)

    @classmethod
    def from_config(cls, config, prepare_dir: str, *, k: int, stored: int) -> DatabaseSweep | None:
        """The sweep eval.database_fractions asks for (None when empty), over W/prepare's
        database, keys and tokenizer, with prepare's BERT."""
        fractions = check_fractions(config.eval.get("database_fractions", ()) or ())
        if not fractions:
            return None
        from retro_jax.data.pipeline import keep_continuation
        from retro_jax.data.tokenizer import load_tokenizer
        from retro_jax.prepare.run import keys_embedding
        from retro_jax.retrieval.chunks import ChunkDatabase, load_keys
        from retro_jax.retrieval.embed import ChunkEmbedder, local_mesh

        # (a remote database's shards are copied to local disk once: every batch reads many)
        database = ChunkDatabase(os.path.join(prepare_dir, "db"), local_cache=True)
        keys = np.concatenate(
            [
                np.asarray(s, np.float32)
                for s in load_keys(os.path.join(prepare_dir, "keys"), database)
            ]
        )
        if len(keys) != len(database):
            raise RetroError(
                f"eval.database_fractions: {prepare_dir}/keys holds {len(keys)} keys for "
                f"{len(database)} database chunks (rerun retro-jax prepare)"
            )
        r = config.retrieval
        max_len, dtype = keys_embedding(prepare_dir)  # the queries as the keys were embedded
        batch = int(r.embed_batch_size)
        embedder = ChunkEmbedder.from_pretrained(
            str(r.bert_path) or None,
            max_len=max_len,
            batch_size=batch,
            mesh=local_mesh(batch),
            dtype=dtype,
        )
        built = files.read_json(os.path.join(prepare_dir, "keys", "keys.json")).get("model_id")
        if built and built != embedder.model_id:
            raise RetroError(
                f"eval.database_fractions: retrieval.bert_path gives the BERT "
                f"{embedder.model_id}, but {prepare_dir}/keys were embedded with {built}"
            )
        tokenizer = load_tokenizer(
            os.path.join(prepare_dir, "tokenizer"), pad_id=int(config.model.pad_id)
        )
        return cls(
            database,
            keys,
            embedder,
            tokenizer,
            database_subsets(database, fractions),
            k=k,
            stored=stored,
            align=bool(r.get("align_neighbours", False)),
            rerank=int(r.get("rerank", 0)),
            continuation=keep_continuation(config),
            prepare_dir=prepare_dir,
        )

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(s.fraction for s in self.subsets)

    def query_chunks(self, tokens: np.ndarray) -> np.ndarray:
        """Input tokens [R, n] -> chunks int32 [R, l, m]."""
        m = self.database.chunk_size
        rows, n = tokens.shape
        return np.asarray(tokens[:, : n // m * m], np.int32).reshape(rows, n // m, m)

    def find(self, tokens: np.ndarray, *, progress: bool = True) -> np.ndarray:
        """Input tokens [R, n] of every eval row -> neighbour ids int64 [F, R, l, k] in each
        subset (F = fractions); -1 for chunks without text."""
        from retro_jax.retrieval.neighbours import QUERY_KEYS, chunk_has_text, load_query_keys

        chunks = self.query_chunks(tokens)
        rows, l, m = chunks.shape  # noqa: E741 - the paper's name for chunks per sequence
        flat = chunks.reshape(rows * l, m)
        live = np.flatnonzero(chunk_has_text(flat, self.tokenizer.pad_id, self.tokenizer.eos_id))
        # Every chunk is in two windows (stride n/2): each distinct one is embedded once.
        unique, inverse = np.unique(flat[live], axis=0, return_inverse=True)
        texts = [self.tokenizer.decode(row) for row in unique]
        queries = np.zeros((len(texts), self.embedder.dim), np.float32)
        # Keys prepare's neighbours stage embedded for these same chunks are not computed again.
        saved = {}
        if self.prepare_dir:
            saved = load_query_keys(os.path.join(self.prepare_dir, QUERY_KEYS), self.embedder)
        fresh = [i for i, text in enumerate(texts) if text not in saved]
        for i, text in enumerate(texts):
            if text in saved:
                queries[i] = saved[text]
        if fresh:
            queries[fresh] = self.embedder.embed([texts[i] for i in fresh], progress=progress)
        self.embedded = len(fresh)
        inverse = np.reshape(inverse, -1)
        out = np.full((len(self.subsets), rows * l, self.k), -1, np.int64)
        bar = tqdm(self.subsets, desc="database sweep: search", unit="subset", disable=not progress)
        for i, subset in enumerate(bar):
            if not self.rerank:
                out[i, live] = exact_neighbours(self.keys, subset, queries, self.k)[inverse]
                continue
            found = exact_neighbours(self.keys, subset, queries, max(self.k, self.rerank))
            windows = neighbour_windows(self.database, found)
            pad = self.tokenizer.pad_id
            kept, _, _ = rerank(found, windows, unique, self.k, pad, self.align)
            out[i, live] = kept[inverse]
        return out.reshape(len(self.subsets), rows, l, self.k)

    def entries(self, ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """One batch: ids [B, l, k] (from `find`), input tokens [B, n] -> neighbours int32
        [B, l, K, 2m] (K = the stored neighbours; slots k.. and missing ones pad_id), the layout
        of the eval batches, so the same compiled scorer reads them."""
        m, pad = self.database.chunk_size, self.database.pad_id
        got = neighbour_entries(self.database, ids, self.query_chunks(tokens), align=self.align)
        if not self.continuation:
            got[..., m:] = pad
        out = np.full((*ids.shape[:2], self.stored, 2 * m), pad, np.int32)
        out[:, :, : self.k] = got
        return out

    def rows(self, bpb: Sequence[float | None], loss: Sequence[float | None]) -> list[dict]:
        """metrics.json's `database_sweep`: per fraction its database and RETRO's score."""
        return [
            {
                "fraction": s.fraction,
                "chunks": s.chunks,
                "documents": s.documents,
                "tokens": s.tokens,
                "bpb": b,
                "loss": x,
            }
            for s, b, x in zip(self.subsets, bpb, loss)
        ]
