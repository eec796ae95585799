"""The chunk database: every retrieval document cut into m-token chunks with continuations.

A document is [EOS] + tokens + [EOS]; chunk u is tokens[u*m : (u+1)*m] and its continuation
the next m tokens of the same document, both padded with pad_id at the document's end, so an
entry never crosses documents. Chunks holding nothing but EOS/padding are left out. Chunk ids
are global and contiguous; shard i holds ids [i*S, (i+1)*S) with S = chunks_per_shard:

    db/shard-NNNNN.tokens.npy   int32 [S_i, 2m]   chunk (m) + continuation (m)
    db/shard-NNNNN.doc_ids.npy  int64 [S_i]       document id of each chunk
    db/docs.npy                 int64 [D, 3]      (doc_id, first chunk id, chunk count), by doc_id
    db/doc_keys.json            {"doc_id": document key}, by doc_id (where each chunk comes from)
    db/db.json                  sizes, chunk size, pad/EOS ids

Writing streams one document at a time and keeps one shard in memory; reading memory-maps local
shards and reads a remote shard (gs://...) whole when it is first touched: kept in memory (the
16 most recently used), or with `local_cache` copied once to a temporary local folder and
memory-mapped (for readers that touch every shard again and again: the local neighbours stage,
live retrieval in `sample`).
The keys stage embeds each shard's detokenized chunks (`write_keys`) into keys/shard-NNNNN.npy.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError

DB_INFO = "db.json"
DOC_KEYS = "doc_keys.json"  # absent from databases built before it: keys shown as "doc <id>"


def chunk_document(tokens: np.ndarray, chunk_size: int, pad_id: int, eos_id: int) -> np.ndarray:
    """tokens [L] -> entries int32 [c, 2m]: chunk u and its continuation, padded; chunks of
    only EOS/padding dropped (they come last, so kept chunk u is still document chunk u)."""
    m = chunk_size
    count = -(-len(tokens) // m)
    padded = np.full((count + 1) * m, pad_id, np.int32)  # one extra chunk: the last continuation
    padded[: len(tokens)] = tokens
    blocks = padded.reshape(count + 1, m)
    entries = np.concatenate([blocks[:-1], blocks[1:]], axis=1)
    has_text = ((blocks[:-1] != pad_id) & (blocks[:-1] != eos_id)).any(axis=1)
    keep = int(np.flatnonzero(has_text)[-1]) + 1 if has_text.any() else 0
    return entries[:keep]


def document_entries(text: str, tokenizer, chunk_size: int) -> tuple[np.ndarray, int]:
    """A document's database entries [c, 2m] and its length in tokens (with both EOS); a
    document with fewer than m tokens of text is "short" (one padded chunk)."""
    ids, _ = tokenizer.document_tokens(text)
    return chunk_document(ids, chunk_size, tokenizer.pad_id, tokenizer.eos_id), len(ids)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def build_chunk_database(
    documents: Iterable,
    tokenizer,
    directory: str,
    *,
    chunk_size: int,
    chunks_per_shard: int,
    max_chunks: int = 0,
    progress: bool = True,
    log=None,
) -> dict:
    """Tokenize and chunk `documents` into `directory` (created if needed). `max_chunks` > 0
    keeps only the first max_chunks chunks (`data.retrieval_max_tokens` / m): documents are read
    until the database is full, the last one cut at the cap.

    Returns the summary written to db.json (documents, chunks, shards, short documents, tokens).
    """
    if chunks_per_shard <= 0:
        raise RetroError(f"data.chunks_per_shard={chunks_per_shard} must be positive")
    files.makedirs(directory)
    m = chunk_size
    shards: list[int] = []
    buffer_tokens: list[np.ndarray] = []
    buffer_docs: list[np.ndarray] = []
    buffered = 0
    docs_table: list[tuple[int, int, int]] = []
    doc_keys: dict[int, str] = {}
    total_chunks = short_docs = tokens_seen = 0
    short_examples: list[str] = []

    def flush(rows: int) -> None:
        nonlocal buffer_tokens, buffer_docs, buffered
        tokens = np.concatenate(buffer_tokens)
        doc_ids = np.concatenate(buffer_docs)
        write_chunk_shard(directory, len(shards), tokens[:rows], doc_ids[:rows])
        shards.append(rows)
        buffer_tokens, buffer_docs = [tokens[rows:]], [doc_ids[rows:]]
        buffered -= rows

    for doc in tqdm(documents, desc="chunk database", unit="doc", disable=not progress):
        entries, length = document_entries(doc.text, tokenizer, m)
        tokens_seen += length
        if length - 2 < m:
            short_docs += 1
            if len(short_examples) < 5:
                short_examples.append(doc.key)
        if max_chunks:
            entries = entries[: max_chunks - total_chunks]
        if not len(entries):
            continue
        docs_table.append((doc.doc_id, total_chunks, len(entries)))
        doc_keys[doc.doc_id] = doc.key
        buffer_tokens.append(entries)
        buffer_docs.append(np.full(len(entries), doc.doc_id, np.int64))
        buffered += len(entries)
        total_chunks += len(entries)
        while buffered >= chunks_per_shard:
            flush(chunks_per_shard)
        if max_chunks and total_chunks >= max_chunks:
            break  # the database is full: the rest of the source is not read
    if buffered:
        flush(buffered)
    return write_database_info(
        directory,
        docs_table,
        doc_keys=doc_keys,
        chunk_size=m,
        chunks_per_shard=chunks_per_shard,
        shards=shards,
        short_documents=short_docs,
        short_examples=short_examples,
        tokens=tokens_seen,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        log=log,
    )


def write_chunk_shard(directory: str, index: int, tokens: np.ndarray, doc_ids: np.ndarray) -> None:
    """Shard `index`: tokens int32 [S_i, 2m] and doc_ids int64 [S_i] (temporary name, rename)."""
    name = os.path.join(directory, shard_name(index))
    files.save_npy(name + ".tokens.npy", tokens.astype(np.int32, copy=False))
    files.save_npy(name + ".doc_ids.npy", doc_ids.astype(np.int64, copy=False))


def write_database_info(
    directory: str,
    docs_table: list[tuple[int, int, int]],
    *,
    doc_keys: dict[int, str] | None = None,
    chunk_size: int,
    chunks_per_shard: int,
    shards: list[int],
    short_documents: int,
    short_examples: list[str],
    tokens: int,
    pad_id: int,
    eos_id: int,
    log=None,
) -> dict:
    """doc_keys.json ({"doc_id": key} of every document in the table, by doc_id; not written
    without `doc_keys`), docs.npy (doc_id, first chunk, count) sorted by doc_id, then db.json;
    checks that the database is not empty and no document occurs twice. Returns db.json's
    contents."""
    total_chunks = sum(shards)
    if total_chunks == 0:
        raise RetroError("chunk database: the retrieval documents produced no chunks")
    if short_documents and log is not None:
        log.warning(
            "chunk database: %d documents shorter than one chunk (%d tokens), kept as one padded "
            "chunk each, e.g. %s",
            short_documents,
            chunk_size,
            ", ".join(short_examples),
        )
    table = np.array(sorted(docs_table), np.int64).reshape(-1, 3)
    duplicates = np.flatnonzero(np.diff(table[:, 0]) == 0)
    if len(duplicates):
        raise RetroError(f"chunk database: document id {table[duplicates[0], 0]} occurs twice")
    if doc_keys is not None:
        keys = {str(doc_id): doc_keys[doc_id] for doc_id in table[:, 0].tolist()}
        files.write_json(os.path.join(directory, DOC_KEYS), keys, indent=0)
    files.save_npy(os.path.join(directory, "docs.npy"), table)
    info = dict(
        chunk_size=chunk_size,
        chunks_per_shard=chunks_per_shard,
        num_chunks=total_chunks,
        num_documents=len(table),
        short_documents=short_documents,
        tokens=tokens,
        shards=[int(n) for n in shards],
        pad_id=pad_id,
        eos_id=eos_id,
    )
    files.write_json(os.path.join(directory, DB_INFO), info, indent=1)
    return info


class _RemoteShards(Sequence):
    """The arrays of remote .npy files, each read whole when first touched; the `keep` most
    recently used stay in memory, so memory is bounded by shard size, not database size.

    With `local_cache`, each file is instead copied once into a temporary local folder (removed
    with this object) and memory-mapped from there: disk for the touched shards, and no remote
    read is ever repeated."""

    def __init__(self, paths: list[str], keep: int = 16, local_cache: bool = False):
        self.paths, self.keep, self.loaded = paths, keep, collections.OrderedDict()
        self.cache_dir = None
        if local_cache:
            self.cache_dir = tempfile.mkdtemp(prefix="retro_jax-shards-")
            weakref.finalize(self, shutil.rmtree, self.cache_dir, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> np.ndarray:
        if self.cache_dir is None:
            return files.load_npy(self.paths[index])
        local = os.path.join(self.cache_dir, f"{index}.npy")
        if not os.path.exists(local):
            files.copy(self.paths[index], local + ".tmp")
            os.replace(local + ".tmp", local)
        return files.load_npy(local)

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self.loaded:
            self.loaded.move_to_end(index)
        else:
            self.loaded[index] = self._read(index)
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
        return self.loaded[index]


def load_shards(paths: list[str], local_cache: bool = False) -> Sequence[np.ndarray]:
    """Arrays of .npy files: memory-mapped when local; remote ones read when first used (into
    memory, or with `local_cache` into a temporary local copy: `_RemoteShards`)."""
    if paths and files.is_remote(paths[0]):
        return _RemoteShards(paths, local_cache=local_cache)
    return [files.load_npy(path) for path in paths]


class ChunkDatabase:
    """Read side of a chunk database folder: memory-mapped shards, lookups by global chunk id.
    `local_cache`: a remote folder's shards are copied to local disk once (`load_shards`)."""

    def __init__(self, directory: str, local_cache: bool = False):
        path = os.path.join(directory, DB_INFO)
        if not files.exists(path):
            raise RetroError(f"chunk database {directory}: no {DB_INFO} (run prepare)")
        self.info = files.read_json(path)
        self.directory, self.local_cache = directory, local_cache
        self.chunk_size = int(self.info["chunk_size"])
        self.per_shard = int(self.info["chunks_per_shard"])
        self.pad_id = int(self.info["pad_id"])
        self.shard_sizes = [int(s) for s in self.info["shards"]]
        self._tokens = self._shards("tokens")
        self._doc_ids = self._shards("doc_ids")
        self.docs = files.load_npy(os.path.join(directory, "docs.npy"))
        self._doc_keys: dict[str, str] | None = None  # doc_keys.json, read on first use

    def _shards(self, what: str) -> Sequence[np.ndarray]:
        names = [f"{shard_name(i)}.{what}.npy" for i in range(len(self.shard_sizes))]
        paths = [os.path.join(self.directory, name) for name in names]
        return load_shards(paths, self.local_cache)

    def __len__(self) -> int:
        return int(self.info["num_chunks"])

    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)

    def shard_tokens(self, index: int) -> np.ndarray:
        """int32 [S_i, 2m], memory-mapped (local)."""
        return self._tokens[index]

    def shard_texts(self, index: int, tokenizer) -> list[str]:
        """Detokenized chunks (first m tokens of each entry) of shard `index`: BERT's input."""
        m = self.chunk_size
        return [tokenizer.decode(row[:m]) for row in np.asarray(self._tokens[index])]

    def _gather(self, arrays: list[np.ndarray], ids: np.ndarray, fill, tail_shape, dtype):
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        out = np.full((len(flat),) + tail_shape, fill, dtype)
        valid = np.flatnonzero(flat >= 0)
        if len(valid) and flat[valid].max() >= len(self):
            raise RetroError(f"chunk id {flat[valid].max()} beyond the database ({len(self)})")
        shard_of = flat[valid] // self.per_shard
        for shard in np.unique(shard_of):
            rows = valid[shard_of == shard]
            out[rows] = arrays[shard][flat[rows] - shard * self.per_shard]
        return out.reshape(ids.shape + tail_shape)

    def entries(self, ids: np.ndarray) -> np.ndarray:
        """ids [...] -> chunk + continuation int32 [..., 2m]; pad_id rows where id is -1."""
        return self._gather(self._tokens, ids, self.pad_id, (2 * self.chunk_size,), np.int32)

    def doc_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [...] -> document id int64 [...]; -1 where id is -1."""
        return self._gather(self._doc_ids, ids, -1, (), np.int64)

    def document_key(self, doc_id: int) -> str:
        """The key of document `doc_id` (its source: a path, path:line, sotu:FILE, ...), from
        doc_keys.json; "doc <id>" where it is unknown (a database built before the keys were
        written, or an id not in the database)."""
        if self._doc_keys is None:
            path = os.path.join(self.directory, DOC_KEYS)
            self._doc_keys = files.read_json(path) if files.exists(path) else {}
        return self._doc_keys.get(str(int(doc_id)), f"doc {int(doc_id)}")

    def document_chunks(self, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """doc_ids [D] -> (first chunk id [D], chunk count [D]); (-1, 0) if not in the database."""
        doc_ids = np.asarray(doc_ids, np.int64)
        table = np.asarray(self.docs)
        where = np.searchsorted(table[:, 0], doc_ids)
        where = np.minimum(where, len(table) - 1)
        found = table[where, 0] == doc_ids
        return np.where(found, table[where, 1], -1), np.where(found, table[where, 2], 0)


def write_keys(
    database: ChunkDatabase,
    tokenizer,
    embedder,
    directory: str,
    *,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Embed every shard's chunks into directory/shard-NNNNN.npy (float32 [S_i, D]).

    Shards already present (a resumed run) are kept; each new one is written under a temporary
    name and renamed, then `on_shard(index)` is called. Returns counts and timing.
    """
    embedded = skipped = 0
    start = time.time()
    bar = tqdm(total=len(database), desc="keys", unit="chunk", disable=not progress)
    for index in range(database.num_shards):
        path = os.path.join(directory, shard_name(index) + ".npy")
        size = database.shard_sizes[index]
        if files.exists(path):
            skipped += size
            bar.update(size)
            continue
        embed_shard(database, index, tokenizer, embedder, directory)
        embedded += size
        bar.update(size)
        if on_shard is not None:
            on_shard(index)
    bar.close()
    seconds = time.time() - start
    return dict(
        chunks=len(database),
        dim=int(embedder.dim),
        model_id=str(embedder.model_id),
        run=dict(embedded=embedded, resumed=skipped, seconds=round(seconds, 3)),
    )


def embed_shard(database: ChunkDatabase, index: int, tokenizer, embedder, directory: str) -> int:
    """Keys of database shard `index` -> directory/shard-NNNNN.npy (float32 [S_i, D]);
    returns S_i."""
    size = database.shard_sizes[index]
    keys = embedder.embed(database.shard_texts(index, tokenizer))
    if keys.shape != (size, embedder.dim):
        raise RetroError(f"keys: shard {index} embedded to shape {keys.shape}")
    files.save_npy(os.path.join(directory, shard_name(index) + ".npy"), keys.astype(np.float32))
    return size


def load_keys(directory: str, database: ChunkDatabase) -> Sequence[np.ndarray]:
    """The keys shards, [S_i, D] each (memory-mapped, or read on first use: `load_shards`, with
    the database's `local_cache`)."""
    paths = [os.path.join(directory, shard_name(i) + ".npy") for i in range(database.num_shards)]
    return load_shards(paths, database.local_cache)
