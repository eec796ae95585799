"""Leakage filter (paper section 2.1): drop training and database documents whose 13-gram Jaccard
similarity to any evaluation document is 0.8 or more, found with MinHash LSH (datasketch).

Shingles are 13-grams of lower-cased whitespace-separated words; a text shorter than 13 words
is one shingle (all its words). The LSH index holds the evaluation documents only (the small
side); training documents stream past it one at a time, so memory does not grow with the
training corpus. LSH candidates are confirmed with the MinHash estimate of the similarity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from retro_jax.data import files
from retro_jax.errors import RetroError


def shingles(text: str, ngram: int = 13) -> list[bytes]:
    """The distinct word n-grams of a text (one shingle if it has fewer than `ngram` words)."""
    words = text.lower().split()
    if len(words) < ngram:
        return [" ".join(words).encode("utf-8")]
    grams = {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}
    return [g.encode("utf-8") for g in sorted(grams)]


def minhash(text: str, *, ngram: int = 13, num_perm: int = 128):
    """datasketch LeanMinHash of a text's shingles (seed fixed, so results are reproducible)."""
    from datasketch import LeanMinHash, MinHash

    sketch = MinHash(num_perm=num_perm, seed=1)
    sketch.update_batch(shingles(text, ngram))
    return LeanMinHash(sketch)


def signature(text: str, *, ngram: int = 13, num_perm: int = 128) -> np.ndarray:
    """The MinHash signature of a text: uint64 [num_perm]."""
    return np.asarray(minhash(text, ngram=ngram, num_perm=num_perm).hashvalues)


def lsh_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for these settings."""
    from datasketch import MinHashLSH

    if not 0.0 < threshold <= 1.0:
        raise RetroError(f"dedup.threshold={threshold} must be in (0, 1]")
    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    except ValueError as e:  # datasketch finds no band layout for these settings
        raise RetroError(f"dedup.threshold={threshold} with dedup.num_perm={num_perm}: {e}") from e
    return lsh.b, lsh.r


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[tuple[int, bytes]]:
    """The LSH bucket of each band: two signatures are candidates iff they share one."""
    return [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(bands)]


def best_twin(sig: np.ndarray, candidates, eval_sigs, threshold: float) -> tuple[int, float] | None:
    """Confirm LSH candidates with the signatures' estimated Jaccard similarity: (candidate
    with the highest, lowest index on ties; its similarity) if it reaches threshold, else None."""
    best = None
    for i in sorted(candidates):
        similarity = float(np.count_nonzero(sig == eval_sigs[i])) / float(len(sig))
        if similarity >= threshold and (best is None or similarity > best[1]):
            best = (i, similarity)
    return best


class LeakageFilter:
    """MinHash LSH over the evaluation texts; `twin(text)` finds a near-duplicate of one."""

    def __init__(
        self,
        eval_texts: Iterable[str],
        *,
        threshold: float = 0.8,
        ngram: int = 13,
        num_perm: int = 128,
    ):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.ngram = ngram
        self.num_perm = num_perm
        bands, rows = lsh_layout(threshold, num_perm)
        self.lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
        self.sketches = []
        for i, text in enumerate(eval_texts):
            sketch = minhash(text, ngram=ngram, num_perm=num_perm)
            self.sketches.append(sketch)
            self.lsh.insert(i, sketch)

    def __len__(self) -> int:
        return len(self.sketches)

    def twin(self, text: str) -> tuple[int, float] | None:
        """(index of the most similar evaluation text, estimated Jaccard) if it reaches the
        threshold, else None."""
        sketch = minhash(text, ngram=self.ngram, num_perm=self.num_perm)
        candidates = self.lsh.query(sketch)
        eval_sigs = {i: self.sketches[i].hashvalues for i in candidates}
        return best_twin(sketch.hashvalues, candidates, eval_sigs, self.threshold)


def near_duplicates(
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    *,
    threshold: float = 0.8,
    ngram: int = 13,
    num_perm: int = 128,
) -> list[int]:
    """Indices of the training texts whose estimated 13-gram Jaccard similarity to some
    evaluation text is >= threshold (ascending)."""
    leak = LeakageFilter(eval_texts, threshold=threshold, ngram=ngram, num_perm=num_perm)
    return [i for i, text in enumerate(train_texts) if leak.twin(text) is not None]


def filter_report(
    eval_source,
    sources: dict,
    *,
    threshold: float = 0.8,
    ngram: int = 13,
    num_perm: int = 128,
    progress: bool = True,
) -> dict:
    """Run the filter: every document of `sources` (role -> Source, e.g. train and retrieval)
    against every document of `eval_source`. Sources with the same spec are read once.

    Returns the report: per-role document counts and one entry per dropped document naming its
    evaluation twin and the estimated similarity.
    """
    from tqdm.auto import tqdm

    eval_docs: list[tuple[int, str]] = []
    eval_texts = []
    for doc in eval_source.documents():
        eval_docs.append((doc.doc_id, doc.key))
        eval_texts.append(doc.text)
    leak = LeakageFilter(eval_texts, threshold=threshold, ngram=ngram, num_perm=num_perm)
    del eval_texts
    roles: dict[str, dict] = {}
    dropped: list[dict] = []
    read: dict[str, str] = {}  # spec -> first role filtered with it
    for role, source in sources.items():
        if source.spec in read:  # same documents as an earlier role: copy its verdicts
            copy_verdicts(roles, dropped, read[source.spec], role)
            continue
        read[source.spec] = role
        count = 0
        for doc in tqdm(source.documents(), desc=f"dedup {role}", unit="doc", disable=not progress):
            count += 1
            twin = leak.twin(doc.text)
            if twin is not None:
                dropped.append(dropped_entry(role, doc, eval_docs[twin[0]], twin[1]))
        roles[role] = role_counts(dropped, role, count, source.stats)
    return make_report(threshold, ngram, num_perm, len(eval_docs), roles, dropped)


def dropped_entry(role: str, doc, eval_doc: tuple[int, str], similarity: float) -> dict:
    """The report's line for a dropped document and its evaluation twin (doc_id, key)."""
    return dict(
        role=role,
        doc_id=doc.doc_id,
        key=doc.key,
        eval_doc_id=eval_doc[0],
        eval_key=eval_doc[1],
        similarity=round(similarity, 4),
    )


def role_counts(dropped: list[dict], role: str, documents: int, stats) -> dict:
    return dict(
        documents=documents,
        dropped=sum(e["role"] == role for e in dropped),
        replaced_utf8=stats.replaced,
        empty_skipped=stats.empty_skipped,
    )


def copy_verdicts(roles: dict, dropped: list[dict], first: str, role: str) -> None:
    """`role` reads the same documents as `first`: the same counts and dropped documents."""
    roles[role] = dict(roles[first])
    dropped += [dict(e, role=role) for e in dropped if e["role"] == first]


def make_report(threshold, ngram, num_perm, eval_documents: int, roles, dropped) -> dict:
    return dict(
        settings=dict(threshold=threshold, ngram=ngram, num_perm=num_perm),
        eval_documents=eval_documents,
        roles=roles,
        dropped=dropped,
    )


def exact_jaccard(a: str, b: str, ngram: int = 13) -> float:
    """The true shingle Jaccard similarity (for tests and reports)."""
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / max(1, len(sa | sb))


def write_report(path: str, report: dict) -> None:
    """The dedup report as JSON, written to path + '.tmp' and renamed."""
    files.write_json(path, report, indent=1, sort_keys=True, default=_json_default)


def read_dropped_ids(path: str) -> dict[str, set[int]]:
    """role -> document ids the report drops (`train`, `retrieval`)."""
    report = files.read_json(path)
    dropped: dict[str, set[int]] = {"train": set(), "retrieval": set()}
    for entry in report["dropped"]:
        dropped[entry["role"]].add(int(entry["doc_id"]))
    return dropped


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
