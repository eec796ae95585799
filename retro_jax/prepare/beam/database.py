"""The retrieval database as Beam transforms: chunks, keys and index, shard by shard.

- chunks: documents are tokenized and chunked in parallel (`document_entries`); their entries
  are placed in ordinal order (`ordered_shards`), so chunk ids and shards equal the local path's.
- keys: one element per database shard; the frozen BERT is loaded once per worker (`setup`) and
  embeds a whole shard per call (batched inside `ChunkEmbedder`, on the worker's accelerator if
  it has one). Shards already written by an interrupted run are kept.
- index: one element per index shard; each worker builds its ScaNN searcher (or exact shard)
  from the key rows it covers and saves it; `index.json` lists them in order.
"""

from __future__ import annotations

import os

import apache_beam as beam
import numpy as np

# Imported at module top, not lazily in DoFn.setup: a lazy transformers import races when a
# worker runs several threads.
from transformers import AutoTokenizer, BertTokenizerFast  # noqa: F401

from retro_jax.data import files
from retro_jax.prepare.beam.documents import SumCounts, collect, load_collected, ordered_shards
from retro_jax.retrieval.chunks import (
    ChunkDatabase,
    document_entries,
    embed_shard,
    load_keys,
    shard_name,
    write_chunk_shard,
    write_database_info,
)


class _Chunk(beam.DoFn):
    """(ordinal, Document) -> (ordinal, {tokens [c, 2m], doc_ids [c]}, (doc_id, ordinal, tokens,
    key)); c may be 0 (the document still counts in db.json)."""

    def __init__(self, tokenizer_dir: str, pad_id: int, chunk_size: int):
        self.tokenizer_dir, self.pad_id, self.chunk_size = tokenizer_dir, pad_id, chunk_size

    def setup(self):
        from retro_jax.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_dir, pad_id=self.pad_id)

    def process(self, item):
        ordinal, doc = item
        entries, length = document_entries(doc.text, self.tokenizer, self.chunk_size)
        rows = dict(tokens=entries, doc_ids=np.full(len(entries), doc.doc_id, np.int64))
        yield ordinal, rows, (doc.doc_id, ordinal, length, doc.key)


class _Counts(beam.CombineFn):
    """tokens seen, short documents, and the keys of the first five short ones (by ordinal)."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def create_accumulator(self):
        return 0, 0, []

    def add_input(self, acc, item):
        ordinal, length, key = item
        short = length - 2 < self.chunk_size
        examples = sorted(acc[2] + [(ordinal, key)])[:5] if short else acc[2]
        return acc[0] + length, acc[1] + short, examples

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (
            sum(a[0] for a in accs),
            sum(a[1] for a in accs),
            sorted(e for a in accs for e in a[2])[:5],
        )

    def extract_output(self, acc):
        return dict(tokens=acc[0], short=acc[1], examples=[key for _, key in acc[2]])


def build_chunks(
    options,
    documents_of,
    tokenizer,
    tokenizer_dir,
    directory,
    *,
    chunk_size,
    per_shard,
    max_chunks=0,
    log=None,
):
    """The chunk database of the retrieval documents in `directory` (as
    `retro_jax.retrieval.chunks.build_chunk_database` writes it, `max_chunks` included: the
    documents that start before the cap, the last one cut at it)."""
    from retro_jax.errors import RetroError

    if per_shard <= 0:
        raise RetroError(f"data.chunks_per_shard={per_shard} must be positive")
    work = os.path.join(directory, "_beam")
    files.makedirs(work)
    with beam.Pipeline(options=options) as p:
        docs, _ = documents_of(p, "retrieval")
        rows = docs | "chunk" >> beam.ParDo(_Chunk(tokenizer_dir, tokenizer.pad_id, chunk_size))
        shards, offsets = ordered_shards(rows, per_shard, "chunks", max_rows=max_chunks)
        written = shards | "write shards" >> beam.Map(lambda s: (s[0], _write_shard(directory, s)))
        collect(written, os.path.join(work, "shards.pkl"), "shard sizes")
        table = offsets | "with chunks" >> beam.Filter(lambda o: o[2] > 0)
        table = table | "table rows" >> beam.Map(lambda o: (o[0][0], o[1], o[2], o[0][3]))
        collect(table, os.path.join(work, "docs.pkl"), "docs table")
        info = offsets | "doc info" >> beam.Map(lambda o: o[0][1:])
        collect(info, os.path.join(work, "counts.pkl"), "counts", _Counts(chunk_size))
    shard_sizes = dict(load_collected(os.path.join(work, "shards.pkl")))
    counts = load_collected(os.path.join(work, "counts.pkl"))
    rows = load_collected(work + "/docs.pkl")  # (doc_id, first chunk, chunks, key)
    docs_table = [(int(d), int(first), int(n)) for d, first, n, _ in rows]
    doc_keys = {int(d): key for d, _, _, key in rows}
    files.rmtree(work)
    return write_database_info(
        directory,
        docs_table,
        doc_keys=doc_keys,
        chunk_size=chunk_size,
        chunks_per_shard=per_shard,
        shards=[shard_sizes[i] for i in range(len(shard_sizes))],
        short_documents=counts["short"],
        short_examples=counts["examples"],
        tokens=counts["tokens"],
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        log=log,
    )


def _write_shard(directory: str, shard) -> int:
    index, rows = shard
    write_chunk_shard(directory, index, rows["tokens"], rows["doc_ids"])
    return len(rows["tokens"])


class _EmbedShard(beam.DoFn):
    """Database shard index -> keys/shard-NNNNN.npy (kept if an interrupted run wrote it)."""

    def __init__(self, prepare_dir: str, out_dir: str, pad_id: int, bert: dict):
        self.prepare_dir, self.out_dir, self.pad_id, self.bert = prepare_dir, out_dir, pad_id, bert

    def setup(self):
        from retro_jax.data.tokenizer import load_tokenizer
        from retro_jax.retrieval import ChunkEmbedder
        from retro_jax.retrieval.embed import local_mesh

        self.database = ChunkDatabase(os.path.join(self.prepare_dir, "db"))
        self.tokenizer = load_tokenizer(
            os.path.join(self.prepare_dir, "tokenizer"), pad_id=self.pad_id
        )
        self.embedder = ChunkEmbedder.from_pretrained(
            self.bert["path"] or None,
            max_len=self.bert["max_len"],
            batch_size=self.bert["batch_size"],
            mesh=local_mesh(self.bert["batch_size"]),  # every accelerator of the worker
            dtype=self.bert.get("dtype", "float32"),
        )

    def process(self, index):
        if files.exists(os.path.join(self.out_dir, shard_name(index) + ".npy")):
            yield 0, self.database.shard_sizes[index]  # kept from an interrupted run
        else:
            yield embed_shard(self.database, index, self.tokenizer, self.embedder, self.out_dir), 0


def build_keys(options, prepare_dir: str, directory: str, *, pad_id: int, bert: dict) -> dict:
    """Keys of every database shard into `directory` (as `write_keys` writes them)."""
    database = ChunkDatabase(os.path.join(prepare_dir, "db"))
    work = os.path.join(directory, "_beam.pkl")
    with beam.Pipeline(options=options) as p:
        done = (
            p
            | "shards" >> beam.Create(list(range(database.num_shards)))
            | "spread" >> beam.Reshuffle()
            | "embed" >> beam.ParDo(_EmbedShard(prepare_dir, directory, pad_id, bert))
        )
        collect(done, work, "counts", SumCounts(2))
    counts = load_collected(work)
    files.remove(work)
    first = files.load_npy(os.path.join(directory, shard_name(0) + ".npy"))
    return dict(
        chunks=len(database),
        dim=int(first.shape[1]),
        model_id=bert["model_id"],
        run=dict(embedded=int(counts[0]), resumed=int(counts[1])),
    )


class _BuildIndexShard(beam.DoFn):
    """Index shard number -> the shard saved in directory/shard-NNNNN; its index.json entry."""

    def __init__(self, prepare_dir: str, directory: str, settings: dict):
        self.prepare_dir, self.directory, self.settings = prepare_dir, directory, settings

    def process(self, number):
        from retro_jax.retrieval.index import build_index_shard

        database = ChunkDatabase(os.path.join(self.prepare_dir, "db"))
        keys = load_keys(os.path.join(self.prepare_dir, "keys"), database)
        yield build_index_shard(
            keys, database.per_shard, len(database), number, self.directory, self.settings
        )


def build_index(options, prepare_dir: str, directory: str, settings: dict, model_id: str) -> dict:
    """Index shards built in parallel into `directory` (loadable by `NeighbourIndex.load`)."""
    from retro_jax.retrieval.index import shard_starts, write_metadata

    database = ChunkDatabase(os.path.join(prepare_dir, "db"))
    dim = files.read_json(os.path.join(prepare_dir, "keys", "keys.json"))["dim"]
    files.makedirs(directory)
    work = os.path.join(directory, "_beam.pkl")
    numbers = list(range(len(shard_starts(len(database), int(settings["shard_size"])))))
    with beam.Pipeline(options=options) as p:
        metas = (
            p
            | "shard numbers" >> beam.Create(numbers)
            | "spread" >> beam.Reshuffle()
            | "build" >> beam.ParDo(_BuildIndexShard(prepare_dir, directory, settings))
        )
        collect(metas, work, "shards")
    shards = load_collected(work)
    files.remove(work)
    write_metadata(directory, dim, model_id, settings, shards)
    return dict(keys=len(database), dim=dim, shards=len(shards))
