"""The leakage filter as distributed MinHash LSH.

Signatures of every document are computed in parallel; each band of a signature is a key, so
grouping by band brings together the documents that share a bucket, exactly the candidates
datasketch's MinHashLSH (same band layout, `lsh_layout`) returns. Candidate pairs are grouped
per training document and confirmed with the signatures' Jaccard estimate (`best_twin`, the
local filter's check). The report is the local path's, entry for entry.
"""

from __future__ import annotations

import os
import types

import apache_beam as beam

from retro_jax.prepare.beam.documents import collect, load_collected, read_documents
from retro_jax.prepare.dedup import (
    band_keys,
    best_twin,
    copy_verdicts,
    dropped_entry,
    lsh_layout,
    make_report,
    role_counts,
    signature,
)


def _pairs(item):
    """A band bucket -> (training ordinal, evaluation ordinal) of every pair it holds."""
    _, members = item
    evals = [o for side, o in members if side == "e"]
    for side, ordinal in members if evals else ():
        if side == "t":
            for e in evals:
                yield ordinal, e


class _Confirm(beam.DoFn):
    """(ordinal, {sig: [(signature, doc)], candidates: [eval ordinals]}) -> (ordinal, entry) of
    a document with an evaluation twin."""

    def __init__(self, role: str, threshold: float):
        self.role, self.threshold = role, threshold

    def process(self, item, eval_sigs, eval_docs):
        ordinal, joined = item
        candidates = set(joined["candidates"])
        if not candidates or not joined["sig"]:
            return
        sig, doc = joined["sig"][0]
        twin = best_twin(sig, candidates, eval_sigs, self.threshold)
        if twin is not None:
            yield ordinal, dropped_entry(self.role, doc, eval_docs[twin[0]], twin[1])


def build_dedup(options, config, sources: dict, eval_source, work: str) -> dict:
    """Run the filter of `sources` (role -> Source) against `eval_source` as one pipeline;
    returns the report (as `retro_jax.prepare.dedup.filter_report` makes it)."""
    c = config.dedup
    threshold, ngram, num_perm = float(c.threshold), int(c.ngram), int(c.num_perm)
    bands, rows = lsh_layout(threshold, num_perm)
    sig = lambda text: signature(text, ngram=ngram, num_perm=num_perm)
    first_role: dict[str, str] = {}  # spec -> first role that reads it
    with beam.Pipeline(options=options) as p:
        docs, stats = read_documents(p, eval_source, "eval")
        eval_sigs = docs | "eval: signatures" >> beam.Map(lambda od: (od[0], sig(od[1].text)))
        eval_info = docs | "eval: ids" >> beam.Map(lambda od: (od[0], (od[1].doc_id, od[1].key)))
        collect(eval_info, os.path.join(work, "eval_docs.pkl"), "eval: docs")
        collect(stats, os.path.join(work, "eval_stats.pkl"), "eval: stats counts", single=True)
        eval_bands = eval_sigs | "eval: bands" >> beam.FlatMap(
            lambda os_: [(key, ("e", os_[0])) for key in band_keys(os_[1], bands, rows)]
        )
        for role, source in sources.items():
            if source.spec in first_role:
                continue
            first_role[source.spec] = role
            docs, stats = read_documents(p, source, role)
            sigs = docs | f"{role}: signatures" >> beam.Map(
                lambda od: (od[0], (sig(od[1].text), od[1]))
            )
            candidates = (
                (
                    eval_bands,
                    sigs
                    | f"{role}: bands"
                    >> beam.FlatMap(
                        lambda os_: [(k, ("t", os_[0])) for k in band_keys(os_[1][0], bands, rows)]
                    ),
                )
                | f"{role}: all bands" >> beam.Flatten()
                | f"{role}: buckets" >> beam.GroupByKey()
                | f"{role}: candidate pairs" >> beam.FlatMap(_pairs)
                | f"{role}: distinct" >> beam.Distinct()
            )
            dropped = (
                {"sig": sigs, "candidates": candidates}
                | f"{role}: join" >> (beam.CoGroupByKey())
                | f"{role}: confirm"
                >> beam.ParDo(
                    _Confirm(role, threshold),
                    beam.pvalue.AsDict(eval_sigs),
                    beam.pvalue.AsDict(eval_info),
                )
            )
            collect(dropped, os.path.join(work, f"{role}_dropped.pkl"), f"{role}: dropped")
            collect(
                stats, os.path.join(work, f"{role}_stats.pkl"), f"{role}: stats counts", single=True
            )

    eval_stats = load_collected(os.path.join(work, "eval_stats.pkl"))
    if not eval_stats["documents"]:
        raise eval_source.empty_error()
    roles: dict[str, dict] = {}
    dropped: list[dict] = []
    for role, source in sources.items():
        first = first_role[source.spec]
        if first != role:
            copy_verdicts(roles, dropped, first, role)
            continue
        counts = load_collected(os.path.join(work, f"{role}_stats.pkl"))
        if not counts["documents"]:
            raise source.empty_error()
        dropped += [e for _, e in sorted(load_collected(os.path.join(work, f"{role}_dropped.pkl")))]
        roles[role] = role_counts(
            dropped, role, counts["documents"], types.SimpleNamespace(**counts)
        )
    report = make_report(threshold, ngram, num_perm, eval_stats["documents"], roles, dropped)
    report["eval_replaced_utf8"] = eval_stats["replaced"]
    return report
