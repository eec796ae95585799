"""Neighbour alignment: slide each retrieved [N, F] window inside its source document to where it
best overlaps the query chunk (`retrieval.align_neighbours`, an option beyond the paper).

Why: chunked cross-attention learns to copy from a neighbour in a few hundred steps when the
copy sits at a fixed offset (neighbour token m + j continues the query's token j), but a real
near-duplicate starts anywhere inside a database chunk, and copying it then needs matching by
content, which small models learn more slowly still (benchmarks/results/retrieval_pays.md).
The database stores every document as consecutive chunks, so the text around a neighbour chunk
p is at hand: the window of 4m tokens

    chunk p-1 (m) | chunk p (m) | its continuation (m) | the continuation's continuation (m)

holds every [N, F] that starts up to m-1 tokens before or after chunk p. The shift s in
[-(m-1), m-1] kept is the one at which the most of the query's m tokens equal the window's
tokens position by position (padding never matches; ties go to the smallest |s|, so s = 0
unless another offset matches strictly more). Alignment reads the query chunk C_u only, which
is complete when its neighbours are used, so it adds no path from a position to its future.
Training, evaluation records and live retrieval in `sample` align the same way.
"""

from __future__ import annotations

import numpy as np

BLOCK = 4096  # neighbours scored at once: [BLOCK, 2m-1, m] booleans


def neighbour_windows(database, ids: np.ndarray) -> np.ndarray:
    """ids [...] -> tokens int32 [..., 4m]: chunk id-1, entry id (chunk + continuation), the
    continuation of chunk id+1; pad_id where that chunk is not of id's document (or id = -1)."""
    m, pad = database.chunk_size, database.pad_id
    ids = np.asarray(ids, np.int64)
    docs = database.doc_ids(ids)

    def of_same_doc(other: np.ndarray) -> np.ndarray:
        other = np.where((ids >= 0) & (other >= 0) & (other < len(database)), other, -1)
        return np.where(database.doc_ids(other) == docs, other, -1)

    before = database.entries(of_same_doc(ids - 1))[..., :m]
    after = database.entries(of_same_doc(ids + 1))[..., m:]
    windows = np.concatenate([before, database.entries(ids), after], axis=-1)
    windows[ids < 0] = pad
    return windows


def best_shifts(
    windows: np.ndarray, queries: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """windows [Q, 4m], queries [Q, m] -> (shift int64 [Q] in [-(m-1), m-1], matches int64
    [Q]): the offset (from the window's second chunk) at which most non-padding query tokens
    match, and how many do there."""
    m = queries.shape[-1]
    offsets = np.arange(1, 2 * m)  # window starts m + s for s in [-(m-1), m-1]
    # Penalty for |s| below one match: more matches always win, then the smallest |s|.
    tie_break = np.abs(offsets - m) / (2.0 * m)
    shifts = np.zeros(len(queries), np.int64)
    best = np.zeros(len(queries), np.int64)
    for start in range(0, len(queries), BLOCK):
        w = windows[start : start + BLOCK]
        q = queries[start : start + BLOCK]
        views = np.lib.stride_tricks.sliding_window_view(w, m, axis=-1)[:, offsets]  # [b, 2m-1, m]
        matches = ((views == q[:, None, :]) & (q[:, None, :] != pad_id)).sum(-1)
        pick = np.argmax(matches - tie_break, axis=-1)
        shifts[start : start + BLOCK] = offsets[pick] - m
        best[start : start + BLOCK] = np.take_along_axis(matches, pick[:, None], 1)[:, 0]
    return shifts, best


def _aligned(windows: np.ndarray, queries: np.ndarray, pad_id: int):
    """windows [..., K, 4m], queries [..., m] -> (aligned entries int32 [..., K, 2m], matches
    int64 [..., K]: query tokens each aligned entry's chunk holds at their positions)."""
    *lead, k, width = windows.shape
    m = width // 4
    flat = windows.reshape(-1, width)
    q = np.broadcast_to(np.asarray(queries)[..., None, :], (*lead, k, m)).reshape(-1, m)
    shifts, matches = best_shifts(flat, q, pad_id)
    picked = np.take_along_axis(flat, (m + shifts)[:, None] + np.arange(2 * m)[None, :], axis=1)
    entries = picked.reshape(*lead, k, 2 * m).astype(np.int32, copy=False)
    return entries, matches.reshape(*lead, k)


def align_entries(windows: np.ndarray, queries: np.ndarray, pad_id: int) -> np.ndarray:
    """windows [..., K, 4m], queries [..., m] (the chunk that retrieved them) -> the aligned
    entries int32 [..., K, 2m]."""
    return _aligned(windows, queries, pad_id)[0]


def rerank(
    ids: np.ndarray, windows: np.ndarray, queries: np.ndarray, k: int, pad_id: int, align: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, of C nearest-first candidates, the k that overlap their query most
    (`retrieval.rerank`): the frozen BERT finds chunks near in meaning, and among them the
    ones holding the query's tokens in order are the ones a copy can be read from.

    ids [..., C] (-1: none), windows [..., C, 4m] (`neighbour_windows`), queries [..., m] ->
    (ids int64 [..., k], entries int32 [..., k, 2m], their places among the candidates [..., k]),
    ranked by the number of query tokens the aligned candidate matches, ties in BERT's order;
    entries aligned if `align`, else as stored.
    """
    m = queries.shape[-1]
    entries, matches = _aligned(windows, queries, pad_id)
    score = np.where(ids >= 0, matches, -1)
    order = np.argsort(-score, axis=-1, kind="stable")[..., :k]
    kept = np.take_along_axis(ids, order, -1)
    if not align:
        entries = windows[..., m : 3 * m]
    picked = np.take_along_axis(entries, order[..., None], -2)
    return kept, np.where(kept[..., None] >= 0, picked, pad_id).astype(np.int32), order


def neighbour_entries(database, ids: np.ndarray, queries: np.ndarray, align: bool) -> np.ndarray:
    """ids [..., K] retrieved by queries [..., m] -> entries int32 [..., K, 2m]: the stored
    [N, F] of each neighbour, or with `align` its window aligned to the query."""
    if not align:
        return database.entries(ids)
    return align_entries(neighbour_windows(database, ids), queries, database.pad_id)


def pick_neighbours(
    database, candidates: np.ndarray, queries: np.ndarray, k: int, *, align: bool, by_overlap: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k neighbours kept of nearest-first candidates [..., C] retrieved by queries [..., m]:
    the k that overlap most (`by_overlap`: retrieval.rerank) or the first k -> (ids int64
    [..., k], entries int32 [..., k, 2m], their places among the candidates [..., k]). Prepare
    and live retrieval in `sample` keep their neighbours through this one function."""
    if by_overlap:
        windows = neighbour_windows(database, candidates)
        return rerank(candidates, windows, queries, k, database.pad_id, align)
    ids = candidates[..., :k]
    order = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
    return ids, neighbour_entries(database, ids, queries, align), order
