"""Sequences and neighbour records as Beam transforms.

- sequences: documents are tokenized and cut in parallel (`cut_document`) and placed in ordinal
  order into shards of `records_per_shard` (`ordered_shards`): the local path's shards.
- neighbours, per sequence shard (the query shard):
  1. plan: the keys of its chunks (stored database keys reused, the rest embedded by the frozen
     BERT, loaded once per worker), fanned out to every index shard;
  2. search: grouped by index shard (so a worker holds one index shard at a time, and the
     group's queries stream past it), each shard returns its top candidates and their document
     ids;
  3. choose: grouped by query shard, the candidates are merged (`merge_topk`, the local
     index's merge) and the sequence's own document excluded (`choose_neighbours`);
  4. gather: neighbour ids grouped by database shard fetch their tokens from that shard only;
  5. write: grouped by query shard again, the records are written with the shared schema
     module (`write_records`), one file per sequence shard, byte-identical to the local path's
     (Beam's WriteToTFRecord would assign records to files in its own order).
  Files already written by an interrupted run are kept.
"""

from __future__ import annotations

import os

import apache_beam as beam
import numpy as np

# Imported at module top, not lazily in DoFn.setup: a lazy transformers import races when a
# worker runs several threads.
from transformers import AutoTokenizer, BertTokenizerFast  # noqa: F401

from retro_jax.data import files
from retro_jax.data.records import write_records
from retro_jax.data.sequences import cut_document, read_sequence_shard, write_sequence_shard
from retro_jax.prepare.beam.documents import SumCounts, collect, load_collected, ordered_shards
from retro_jax.retrieval.align import align_entries, neighbour_windows, rerank
from retro_jax.retrieval.chunks import ChunkDatabase, load_keys
from retro_jax.retrieval.neighbours import (
    NeighbourFinder,
    choose_neighbours,
    query_chunks,
    record_file_name,
    shard_records,
)


class _Cut(beam.DoFn):
    """(ordinal, Document) -> (ordinal, the document's sequences (`cut_document`), None); tagged
    `info`: (1, tokens, bytes) of the document."""

    def __init__(self, tokenizer_dir: str, pad_id: int, seq_len: int, split: str):
        self.tokenizer_dir, self.pad_id = tokenizer_dir, pad_id
        self.seq_len, self.split = seq_len, split

    def setup(self):
        from retro_jax.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_dir, pad_id=self.pad_id)

    def process(self, item):
        ordinal, doc = item
        ids, counts = self.tokenizer.document_tokens(doc.text)
        yield beam.pvalue.TaggedOutput("info", np.array([1, len(ids), counts.sum()], np.int64))
        rows = cut_document(
            ids,
            counts,
            doc_id=doc.doc_id,
            seq_len=self.seq_len,
            pad_id=self.tokenizer.pad_id,
            split=self.split,
        )
        if len(rows["doc_id"]):
            yield ordinal, rows, None


def build_sequences(options, documents_of, tokenizer_dir, pad_id, directory, *, seq_len, per_shard):
    """Train and eval sequence shards in `directory`; returns {split: summary} as
    `retro_jax.data.sequences.write_sequences` returns them."""
    from retro_jax.errors import RetroError

    if seq_len % 2:
        raise RetroError(f"data.seq_len={seq_len} must be even (evaluation stride is n/2)")
    if per_shard <= 0:
        raise RetroError(f"data.records_per_shard={per_shard} must be positive")
    files.makedirs(directory)
    work = lambda name: os.path.join(directory, f"_beam-{name}.pkl")
    with beam.Pipeline(options=options) as p:
        for split in ("train", "eval"):
            docs, _ = documents_of(p, split)
            cut = docs | f"{split}: cut" >> beam.ParDo(
                _Cut(tokenizer_dir, pad_id, seq_len, split)
            ).with_outputs("info", main="rows")
            shards, _ = ordered_shards(cut.rows, per_shard, f"{split} sequences")
            written = shards | f"{split}: write" >> beam.Map(
                lambda s, split=split: write_sequence_shard(directory, split, s[0], s[1])
            )
            collect(written, work(split + "-shards"), f"{split}: shards")
            collect(cut.info, work(split + "-docs"), f"{split}: docs", SumCounts(3))
    summaries = {}
    for split in ("train", "eval"):
        shards = sorted(load_collected(work(split + "-shards")), key=lambda s: s["name"])
        documents, tokens, size = load_collected(work(split + "-docs"))
        summaries[split] = dict(
            split=split,
            shards=shards,
            documents=int(documents),
            tokens=int(tokens),
            bytes=int(size),
        )
        for name in ("-shards", "-docs"):
            files.remove(work(split + name))
    return summaries


@beam.typehints.with_output_types(tuple[int, tuple])
class _Plan(beam.DoFn):
    """(split, shard number, shards in split, sequence file) -> the shard's plan, tagged
    `header`, keyed by file name; its queries fanned out to every index shard."""

    def __init__(self, prepare_dir: str, out_dir: str, settings: dict):
        self.prepare_dir, self.out_dir, self.settings = prepare_dir, out_dir, settings

    def setup(self):
        from retro_jax.data.tokenizer import load_tokenizer
        from retro_jax.retrieval import ChunkEmbedder, NeighbourIndex
        from retro_jax.retrieval.embed import local_mesh

        s = self.settings
        database = ChunkDatabase(os.path.join(self.prepare_dir, "db"))
        meta = NeighbourIndex.read_metadata(os.path.join(self.prepare_dir, "index"))
        self.index_shards = [i for i, shard in enumerate(meta["shards"]) if shard["count"]]
        self.finder = NeighbourFinder(
            database,
            load_keys(os.path.join(self.prepare_dir, "keys"), database),
            None,
            ChunkEmbedder.from_pretrained(
                s["bert_path"] or None,
                max_len=s["max_len"],
                batch_size=s["batch_size"],
                mesh=local_mesh(s["batch_size"]),  # every accelerator of the worker
                dtype=s.get("dtype", "float32"),
            ),
            load_tokenizer(os.path.join(self.prepare_dir, "tokenizer"), pad_id=s["pad_id"]),
            num_neighbours=s["k"],
            query_multiplier=s["multiplier"],
            exclude_same_document=s["exclude"],
            align=s.get("align", False),
            rerank=s.get("rerank", 0),
        )

    def process(self, item):
        split, number, total, sequence_file = item
        name = record_file_name(split, number, total)
        if not files.exists(os.path.join(self.out_dir, name)):  # else kept from a killed run
            yield from self._plan(split, name, sequence_file)

    def _plan(self, split: str, name: str, sequence_file: str):
        sequences = read_sequence_shard(os.path.join(self.prepare_dir, "sequences", sequence_file))
        before = self.finder.embedded, self.finder.reused
        plan = self.finder.plan(sequences, split)
        queries = plan.pop("queries")
        used = (self.finder.embedded - before[0], self.finder.reused - before[1])
        yield beam.pvalue.TaggedOutput("header", (name, ("plan", (plan, sequence_file, used))))
        if len(plan["live"]):
            for shard in self.index_shards:
                yield shard, (name, queries, plan["ask"])


class _Search(beam.DoFn):
    """(index shard, [(file, queries, ask)]) -> (file, (shard, ids, distances, document ids)) of
    every query shard: one index shard in memory at a time, loaded once per group."""

    def __init__(self, prepare_dir: str):
        self.prepare_dir = prepare_dir

    def setup(self):
        from retro_jax.retrieval import NeighbourIndex

        self.folder = os.path.join(self.prepare_dir, "index")
        self.meta = NeighbourIndex.read_metadata(self.folder)
        self.database = ChunkDatabase(os.path.join(self.prepare_dir, "db"))

    def process(self, item):
        from retro_jax.retrieval.index import load_shard

        shard, requests = item
        searcher = load_shard(self.folder, self.meta["shards"][shard], self.meta["dim"])
        for name, queries, ask in requests:
            ids, dist = searcher.search(queries, ask)
            yield name, ("found", (shard, ids, dist, self.database.doc_ids(ids)))


@beam.typehints.with_output_types(tuple[int, tuple])
class _Choose(beam.DoFn):
    """(file, [plan, found per index shard]) -> neighbour ids, tagged `ids` (file, ...), and
    per database shard the rows to fetch (db shard, (file, positions, ids))."""

    def __init__(self, k: int, per_shard: int, rerank: int):
        self.k, self.per_shard, self.rerank = k, per_shard, rerank

    def process(self, item):
        from retro_jax.retrieval.index import merge_topk

        name, parts = item
        plan, sequence_file, used = next(v for tag, v in parts if tag == "plan")
        found = sorted((v for tag, v in parts if tag == "found"), key=lambda f: f[0])
        q = len(plan["live"])
        ids_found = docs_found = np.zeros((q, plan["ask"]), np.int64)
        if found:
            ids_found, _, docs_found = merge_topk([f[1:] for f in found], q, plan["ask"])
        ids, missing = choose_neighbours(plan, ids_found, docs_found, self.k)
        if self.rerank:  # the candidates `_Write` keeps K of (missing: the same for those K)
            ids, _ = choose_neighbours(plan, ids_found, docs_found, self.rerank)
        yield beam.pvalue.TaggedOutput("ids", (name, ("ids", (ids, sequence_file, used, missing))))
        flat = ids.reshape(-1)
        valid = np.flatnonzero(flat >= 0)
        db_shard = flat[valid] // self.per_shard
        for shard in np.unique(db_shard):
            rows = valid[db_shard == shard]
            yield int(shard), (name, rows, flat[rows])


class _Gather(beam.DoFn):
    """(db shard, [(file, positions, ids)]) -> (file, (positions, entries [r, 2m])), or with
    `align` or `rerank` the windows [r, 4m] around them that `_Write` aligns or ranks."""

    def __init__(self, prepare_dir: str, windows: bool):
        self.prepare_dir, self.windows = prepare_dir, windows

    def setup(self):
        self.database = ChunkDatabase(os.path.join(self.prepare_dir, "db"))

    def process(self, item):
        _, requests = item
        fetch = neighbour_windows if self.windows else ChunkDatabase.entries
        for name, rows, ids in requests:
            yield name, ("entries", (rows, fetch(self.database, ids)))


class _Write(beam.DoFn):
    """(file, [ids, entries pieces]) -> the record file; (records, queries, embedded, reused,
    missing)."""

    def __init__(self, prepare_dir: str, out_dir: str, spec, pad_id: int, settings: dict):
        self.prepare_dir, self.out_dir, self.spec, self.pad_id = prepare_dir, out_dir, spec, pad_id
        self.align, self.rerank = settings.get("align", False), settings.get("rerank", 0)

    def process(self, item):
        name, parts = item
        ids, sequence_file, used, missing = next(v for tag, v in parts if tag == "ids")
        width = (4 if self.align or self.rerank else 2) * self.spec.chunk_size
        entries = np.full((ids.size, width), self.pad_id, np.int32)
        for tag, value in parts:
            if tag == "entries":
                entries[value[0]] = value[1]
        sequences = read_sequence_shard(os.path.join(self.prepare_dir, "sequences", sequence_file))
        entries = entries.reshape(ids.shape + (-1,))
        if self.rerank:
            queries = query_chunks(sequences, ids)
            ids, entries, _ = rerank(
                ids, entries, queries, self.spec.num_neighbours, self.pad_id, self.align
            )
        elif self.align:
            entries = align_entries(entries, query_chunks(sequences, ids), self.pad_id)
        examples = shard_records(sequences, ids, entries)
        write_records(os.path.join(self.out_dir, name), examples, spec=self.spec)
        yield np.array([len(examples) * self.spec.num_chunks, *used, missing], np.int64)


def build_neighbours(options, prepare_dir: str, out_dir: str, sequences: dict, spec, settings):
    """Record files of every sequence shard into `out_dir`; returns what this run did:
    {queries, embedded, reused_keys, missing_neighbours}."""
    database = ChunkDatabase(os.path.join(prepare_dir, "db"))
    work = os.path.join(out_dir, "_beam.pkl")
    items = [
        (split, i, len(sequences[split]["shards"]), shard["name"])
        for split in ("train", "eval")
        for i, shard in enumerate(sequences[split]["shards"])
    ]
    with beam.Pipeline(options=options) as p:
        planned = (
            p
            | "query shards" >> beam.Create(items)
            | "spread" >> beam.Reshuffle()
            | "plan"
            >> beam.ParDo(_Plan(prepare_dir, out_dir, settings)).with_outputs(
                "header", main="queries"
            )
        )
        found = (
            planned.queries
            | "by index shard" >> beam.GroupByKey()
            | "search" >> beam.ParDo(_Search(prepare_dir))
        )
        chosen = (
            (planned.header, found)
            | "plans and results" >> beam.Flatten()
            | "by query shard" >> beam.GroupByKey()
            | "choose"
            >> beam.ParDo(
                _Choose(spec.num_neighbours, database.per_shard, settings.get("rerank", 0))
            ).with_outputs("ids", main="requests")
        )
        entries = (
            chosen.requests
            | "by database shard" >> beam.GroupByKey()
            | "gather"
            >> beam.ParDo(
                _Gather(prepare_dir, bool(settings.get("align") or settings.get("rerank")))
            )
        )
        done = (
            (chosen.ids, entries)
            | "ids and entries" >> beam.Flatten()
            | "by record file" >> beam.GroupByKey()
            | "write"
            >> beam.ParDo(_Write(prepare_dir, out_dir, spec, settings["pad_id"], settings))
        )
        collect(done, work, "counts", SumCounts(4))
    counts = load_collected(work)
    files.remove(work)
    return dict(
        queries=int(counts[0]),
        embedded=int(counts[1]),
        reused_keys=int(counts[2]),
        missing_neighbours=int(counts[3]),
    )
