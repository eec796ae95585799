"""Beam transforms shared by the stages: sources read in parallel, and rows put back in order.

A source is read part by part (a file, an address, a TFDS file: `Source.parts()`), each part on
whichever worker gets it. Document order is the local path's order, restored from (part,
position): per-part counts give each document its global ordinal, and `max_docs` keeps the
first ordinals. `ordered_shards` turns per-document rows (chunk entries, sequences) into shards
of a fixed size whose rows follow the ordinals, so chunk ids and shard contents equal the
single-process path's.
"""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np

from retro_jax.data import files

BLOCK = 1024  # documents per group when per-document row counts become global row offsets


class _Prefix:
    """prefix(sizes)(key): the sum of the sizes of smaller keys, for a side-input dict {key:
    size} (keys absent from it count 0). Sorted once per worker, not once per element."""

    def __init__(self):
        self._source = None

    def __call__(self, sizes: dict):
        if self._source is not sizes:
            keys = np.array(sorted(sizes), np.int64)
            totals = np.concatenate([[0], np.cumsum([sizes[k] for k in keys], dtype=np.int64)])
            self._source = sizes
            self._lookup = lambda key: int(totals[np.searchsorted(keys, key)])
        return self._lookup


class _ReadPart(beam.DoFn):
    """(part index, part) -> ((part index, position), document or None if empty, replaced)."""

    def __init__(self, source):
        self.source = source

    def process(self, item):
        index, part = item
        position = 0
        self.source.stats.replaced = 0  # (the driver's count may have come with the pickle)
        for doc in self.source.read_part(part):
            replaced = self.source.stats.replaced
            self.source.stats.replaced = 0
            if doc.text.strip():
                yield (index, position), doc, replaced
                position += 1
            else:  # an empty document counts where the next document would
                yield (index, position), None, replaced


class _Ordinal(beam.DoFn):
    """Adds the global ordinal; drops documents past max_docs."""

    def __init__(self, max_docs: int):
        self.max_docs = max_docs
        self.prefix = _Prefix()

    def process(self, item, part_sizes):
        (part, position), doc, replaced = item
        ordinal = self.prefix(part_sizes)(part) + position
        if self.max_docs and ordinal >= self.max_docs:
            return
        yield ordinal, doc, replaced


class _SourceStats(beam.CombineFn):
    """Documents, empty documents and replaced UTF-8 sequences of the documents read."""

    def create_accumulator(self):
        return np.zeros(3, np.int64)

    def add_input(self, acc, item):
        _, doc, replaced = item
        return acc + np.array([doc is not None, doc is None, replaced], np.int64)

    def merge_accumulators(self, accs):
        return sum(accs, np.zeros(3, np.int64))

    def extract_output(self, acc):
        return dict(documents=int(acc[0]), empty_skipped=int(acc[1]), replaced=int(acc[2]))


def read_documents(pipeline, source, label: str):
    """(documents: PCollection of (ordinal, Document), stats: one-element PCollection of
    {documents, empty_skipped, replaced})."""
    parts = list(enumerate(source.parts()))
    raw = (
        pipeline
        | f"{label}: parts" >> beam.Create(parts)
        | f"{label}: spread" >> beam.Reshuffle()
        | f"{label}: read" >> beam.ParDo(_ReadPart(source))
    )
    sizes = (
        raw
        | f"{label}: keep" >> beam.Filter(lambda item: item[1] is not None)
        | f"{label}: part" >> beam.Map(lambda item: (item[0][0], 1))
        | f"{label}: count" >> beam.CombinePerKey(sum)
    )
    ordered = raw | f"{label}: ordinal" >> beam.ParDo(
        _Ordinal(source.max_docs), beam.pvalue.AsDict(sizes)
    )
    stats = ordered | f"{label}: stats" >> beam.CombineGlobally(_SourceStats())
    documents = (
        ordered
        | f"{label}: documents" >> beam.Filter(lambda item: item[1] is not None)
        | f"{label}: by ordinal" >> beam.Map(lambda item: (item[0], item[1]))
    )
    return documents, stats


def _rows(rows: dict) -> int:
    return len(next(iter(rows.values())))


class _Place(beam.DoFn):
    """One block of documents (ordinal, rows, meta) -> shard pieces (shard, (first row, rows))
    and, tagged `offsets`, (meta, first row, row count) of each document."""

    def __init__(self, per_shard: int, max_rows: int = 0):
        self.per_shard, self.max_rows = per_shard, max_rows
        self.prefix = _Prefix()

    def process(self, item, block_sizes):
        block, documents = item
        row = self.prefix(block_sizes)(block)
        for _, rows, meta in sorted(documents, key=lambda d: d[0]):
            count = _rows(rows)
            if self.max_rows:  # only documents that start before the cap, cut at it
                if row >= self.max_rows:
                    return
                count = min(count, self.max_rows - row)
            yield beam.pvalue.TaggedOutput("offsets", (meta, row, count))
            done = 0
            while done < count:
                shard, within = divmod(row + done, self.per_shard)
                take = min(count - done, self.per_shard - within)
                piece = {k: v[done : done + take] for k, v in rows.items()}
                yield shard, (row + done, piece)
                done += take
            row += count


def _join(item):
    shard, pieces = item
    pieces = sorted(pieces, key=lambda p: p[0])
    return shard, {k: np.concatenate([p[1][k] for p in pieces]) for k in pieces[0][1]}


def ordered_shards(rows, per_shard: int, label: str, *, max_rows: int = 0):
    """rows: PCollection of (ordinal, {name: array [r, ...]}, meta) -> (shards: PCollection of
    (shard index, {name: array [per_shard or fewer, ...]}) in ordinal order, offsets:
    PCollection of (meta, first global row, r) per document). `max_rows` > 0 keeps the first
    max_rows rows: documents that start later are left out, the one across the cap is cut."""
    sizes = (
        rows
        | f"{label}: block rows" >> beam.Map(lambda d: (d[0] // BLOCK, _rows(d[1])))
        | f"{label}: block sizes" >> beam.CombinePerKey(sum)
    )
    placed = (
        rows
        | f"{label}: by block" >> beam.Map(lambda d: (d[0] // BLOCK, d))
        | f"{label}: blocks" >> beam.GroupByKey()
        | f"{label}: place"
        >> beam.ParDo(_Place(per_shard, max_rows), beam.pvalue.AsDict(sizes)).with_outputs(
            "offsets", main="pieces"
        )
    )
    shards = (
        placed.pieces
        | f"{label}: by shard" >> beam.GroupByKey()
        | f"{label}: join" >> beam.Map(_join)
    )
    return shards, placed.offsets


class SumCounts(beam.CombineFn):
    """Element-wise sum of int64 [width] count arrays, summed on the workers (not listed)."""

    def __init__(self, width: int):
        self.width = width

    def create_accumulator(self):
        return np.zeros(self.width, np.int64)

    def add_input(self, acc, item):
        return acc + np.asarray(item, np.int64)

    def merge_accumulators(self, accs):
        return sum(accs, np.zeros(self.width, np.int64))

    def extract_output(self, acc):
        return acc


def collect(pcoll, path: str, label: str, combine=None, *, single: bool = False):
    """Write the elements of a PCollection as a list (or `combine` of them; or its one element
    if `single`) to a pickle file the driver reads after the pipeline finished
    (`load_collected`)."""

    def write(value):
        if single:
            value = value[0] if value else None
        files.write_bytes(path, pickle.dumps(value))

    combined = pcoll | f"{label}: combine" >> beam.CombineGlobally(
        combine or beam.combiners.ToListCombineFn()
    )
    return combined | f"{label}: write" >> beam.Map(write)


def load_collected(path: str):
    return pickle.loads(files.read_bytes(path))
