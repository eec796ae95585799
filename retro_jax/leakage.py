"""The maths of evaluation: bits per byte, and the paper's leakage measure r(C) and bpb(alpha).

Bits per byte (paper section 4): the summed negative log-likelihood in bits of the scored tokens
divided by the UTF-8 bytes of the text they encode, so models with different tokenizers compare.

Leakage (paper section 4.4, figure 6): for an evaluation chunk C (m tokens) and its retrieved
neighbours (2m tokens each: chunk + continuation), s(C) is the longest run of consecutive tokens
that C shares with any one neighbour and r(C) = s(C) / m. The neighbours are those the model
reads: `retro-jax eval` passes the first k = eval.num_neighbours of the stored ones. bpb(alpha)
is the bits per byte over the chunks with r(C) <= alpha: at alpha = 0 no chunk shares even one
token with its neighbours, at alpha = 1 every chunk counts. Padding never matches (a chunk cut
short by its document's end does not "share" its padding with a missing neighbour).

Which scored tokens belong to chunk u: the targets at positions u*m .. u*m+m-1 of a record (the
tokens u*m+1 .. (u+1)*m, i.e. the chunk shifted by one, as records align inputs and targets).

Everything here is numpy and pure; `LeakageHistogram` only accumulates sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

# alpha = 0, 1/8, 2/8, ..., 1: the paper's figure 6 axis.
ALPHAS: tuple[float, ...] = tuple(i / 8 for i in range(9))

# Stand-ins that can never equal a token id (nor each other across chunk and neighbours).
_CHUNK_PAD, _NEIGHBOUR_PAD = -1, -2


def bits_per_byte(nll_nats: float, scored_bytes: float) -> float | None:
    """The summed negative log-likelihood (nats) of the scored tokens, in bits per UTF-8 byte of
    the text they encode; None when no byte is scored. Every bpb `retro-jax eval` reports (its
    totals, `evaluate.summary`, and each point of the leakage curve) is this function's."""
    if scored_bytes <= 0:
        return None
    return nll_nats / math.log(2) / scored_bytes


def longest_common_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest common substring (consecutive tokens) of a[i] and b[i].

    a [N, p], b [N, q] int -> int32 [N]. Dynamic programming over the rows of a, vectorised over
    N and q: run[j] after row i = length of the common run ending at a[i], b[j]. Negative values
    act as wildcards that never match: callers map padding to distinct negatives.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected [N, p] and [N, q], got {a.shape} and {b.shape}")
    n, q = b.shape
    run = np.zeros((n, q), np.int32)
    best = np.zeros(n, np.int32)
    for i in range(a.shape[1]):
        equal = (a[:, i : i + 1] == b) & (b >= 0)  # [N, q]
        shifted = np.zeros_like(run)
        shifted[:, 1:] = run[:, :-1]  # the run ending at (i-1, j-1)
        run = np.where(equal, shifted + 1, 0).astype(np.int32)
        best = np.maximum(best, run.max(axis=1, initial=0))
    return best


def chunk_overlap(
    tokens: np.ndarray, neighbours: np.ndarray, pad_id: int, k: int | None = None
) -> np.ndarray:
    """s(C) of every chunk: its longest run of tokens shared with any one of its neighbours.

    tokens int [B, n]; neighbours int [B, l, K, 2m] (l = n // m) -> int32 [B, l] in 0..m.
    k: only the first k neighbours count, the ones RETRO reads (None = all K).
    The neighbours are laid side by side with a separator between them, so one pass finds the
    longest run and no run crosses from one neighbour into the next.
    """
    if k is not None:
        neighbours = neighbours[:, :, :k]
    batch, chunks, k, r = neighbours.shape
    m = tokens.shape[1] // chunks
    c = np.where(tokens[:, : chunks * m] == pad_id, _CHUNK_PAD, tokens[:, : chunks * m])
    c = c.reshape(batch * chunks, m)
    nb = np.where(neighbours == pad_id, _NEIGHBOUR_PAD, neighbours).reshape(batch * chunks, k, r)
    separator = np.full((batch * chunks, k, 1), _NEIGHBOUR_PAD, nb.dtype)
    side_by_side = np.concatenate([nb, separator], axis=2).reshape(batch * chunks, k * (r + 1))
    return longest_common_run(c, side_by_side).reshape(batch, chunks)


def chunk_sums(values: np.ndarray, chunk_size: int) -> np.ndarray:
    """Per-position values [B, n] -> sums over each chunk's positions [B, n // m]."""
    batch, n = values.shape
    chunks = n // chunk_size
    return values[:, : chunks * chunk_size].reshape(batch, chunks, chunk_size).sum(axis=2)


class LeakageHistogram:
    """Sums over chunks grouped by s(C) = 0..m: chunk counts, scored tokens and bytes, and the
    nll of each scoring mode (e.g. retrieval, no_retrieval, baseline). Adding batches and
    reading the curve are separate, so hosts can sum their `arrays()` before `curve()`."""

    def __init__(self, chunk_size: int, modes: Iterable[str], reference: str | None = None):
        self.chunk_size = int(chunk_size)
        self.modes = tuple(modes)
        if reference is not None and reference not in self.modes:
            raise ValueError(f"reference {reference!r} is not one of the modes {self.modes}")
        self.reference = reference
        bins = self.chunk_size + 1
        self.chunks = np.zeros(bins, np.int64)
        self.tokens = np.zeros(bins, np.float64)
        self.bytes = np.zeros(bins, np.float64)
        self.nll = {mode: np.zeros(bins, np.float64) for mode in self.modes}
        # For the paired standard errors against `reference`: per chunk c, bytes b_c and the
        # difference e_c of the mode's nll and the reference's, sums of b^2, e^2 and e*b.
        self.paired = [mode for mode in self.modes if reference and mode != reference]
        self.bytes_sq = np.zeros(bins, np.float64)
        self.diff_sq = {mode: np.zeros(bins, np.float64) for mode in self.paired}
        self.diff_bytes = {mode: np.zeros(bins, np.float64) for mode in self.paired}

    def add(
        self,
        overlap: np.ndarray,
        mask: np.ndarray,
        target_bytes: np.ndarray,
        nll: Mapping[str, np.ndarray],
    ) -> None:
        """overlap int [B, l] (chunk_overlap); mask, target_bytes [B, n]; nll {mode: [B, n]}."""
        m = self.chunk_size
        mask = np.asarray(mask, np.float64)
        chunk_tokens = chunk_sums(mask, m)
        scored = chunk_tokens > 0  # chunks with nothing scored (padding rows) are not counted
        s = np.asarray(overlap)[scored]
        self.chunks += np.bincount(s, minlength=m + 1)
        self.tokens += np.bincount(s, chunk_tokens[scored], minlength=m + 1)
        scored_bytes = chunk_sums(np.asarray(target_bytes, np.float64) * mask, m)[scored]
        self.bytes += np.bincount(s, scored_bytes, minlength=m + 1)
        self.bytes_sq += np.bincount(s, scored_bytes**2, minlength=m + 1)
        chunk_nll = {
            mode: chunk_sums(np.asarray(nll[mode], np.float64) * mask, m)[scored]
            for mode in self.modes
        }
        for mode in self.modes:
            self.nll[mode] += np.bincount(s, chunk_nll[mode], minlength=m + 1)
        for mode in self.paired:
            diff = chunk_nll[mode] - chunk_nll[self.reference]
            self.diff_sq[mode] += np.bincount(s, diff**2, minlength=m + 1)
            self.diff_bytes[mode] += np.bincount(s, diff * scored_bytes, minlength=m + 1)

    def arrays(self) -> np.ndarray:
        """All sums as one float64 array [4 + modes + 2 * paired modes, m + 1] (to sum over
        hosts)."""
        rows = [self.chunks, self.tokens, self.bytes, self.bytes_sq, *self.nll.values()]
        rows += [*self.diff_sq.values(), *self.diff_bytes.values()]
        return np.stack(rows).astype(np.float64)

    def load_arrays(self, arrays: np.ndarray) -> None:
        """Replace the sums by `arrays` (the layout of `arrays()`)."""
        self.chunks = np.rint(arrays[0]).astype(np.int64)
        self.tokens, self.bytes, self.bytes_sq = (a.copy() for a in arrays[1:4])
        rows = iter(arrays[4:])
        self.nll = {mode: next(rows).copy() for mode in self.modes}
        self.diff_sq = {mode: next(rows).copy() for mode in self.paired}
        self.diff_bytes = {mode: next(rows).copy() for mode in self.paired}

    def _paired_se(self, mode: str, keep: slice) -> float | None:
        """Standard error (bits per byte) of bpb(mode) - bpb(reference) over the chunks of the
        bins `keep`, the chunks taken as the sampled units (a ratio estimator, linearised): with
        D = sum(e) / sum(b), se = sqrt(n / (n - 1) * sum((e - D b)^2)) / sum(b) / ln 2. Chunks
        of one document are not independent, so it is a floor on the uncertainty, not more."""
        n = int(self.chunks[keep].sum())
        total_bytes = float(self.bytes[keep].sum())
        if n < 2 or total_bytes <= 0:
            return None
        d = float(self.nll[mode][keep].sum() - self.nll[self.reference][keep].sum()) / total_bytes
        residual = (
            self.diff_sq[mode][keep].sum()
            - 2 * d * self.diff_bytes[mode][keep].sum()
            + d * d * self.bytes_sq[keep].sum()
        )
        return math.sqrt(n / (n - 1) * max(float(residual), 0.0)) / total_bytes / math.log(2)

    def curve(self, alphas: Iterable[float] = ALPHAS) -> list[dict]:
        """Per alpha: chunks with r(C) <= alpha, and each mode's bpb over them (None if no byte).

        -> [{"alpha", "chunks", "tokens", "bytes", "<mode>_bpb" ..., "<mode>_se" ...}, ...],
        "<mode>_se" for each mode but the reference: the standard error of its bpb minus the
        reference's over those chunks (None under 2 chunks).
        """
        rows = []
        for alpha in alphas:
            top = int(math.floor(float(alpha) * self.chunk_size + 1e-9))  # s <= alpha * m
            keep = slice(0, top + 1)
            scored_bytes = float(self.bytes[keep].sum())
            row = {
                "alpha": float(alpha),
                "chunks": int(self.chunks[keep].sum()),
                "tokens": int(round(self.tokens[keep].sum())),
                "bytes": int(round(scored_bytes)),
            }
            for mode in self.modes:
                row[f"{mode}_bpb"] = bits_per_byte(float(self.nll[mode][keep].sum()), scored_bytes)
            for mode in self.paired:
                row[f"{mode}_se"] = self._paired_se(mode, keep)
            rows.append(row)
        return rows


def curve_lines(rows: list[dict]) -> list[str]:
    """The leakage table `retro-jax eval` and the demo print: per alpha, the chunks, each model's
    bpb and, where the baseline was scored, RETRO minus the baseline with its standard error."""

    def num(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [
        f"{'alpha':>7}{'chunks':>8}{'RETRO':>10}{'RETRO[OFF]':>12}{'baseline':>10}"
        f"{'RETRO - baseline':>22}"
    ]
    for r in rows:
        retro, base, se = r.get("retrieval_bpb"), r.get("baseline_bpb"), r.get("retrieval_se")
        diff = "" if retro is None or base is None else num(retro - base, "+.4f")
        if diff and se is not None:
            diff += f" +- {num(se)}"
        line = f"{r['alpha']:>7.3f}{r['chunks']:>8}{num(retro):>10}"
        line += f"{num(r.get('no_retrieval_bpb')):>12}{num(base):>10}{diff:>22}"
        lines.append(line.rstrip())
    return lines
