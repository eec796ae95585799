"""The maths of evaluation against brute-force references: bits per byte, longest common token
runs, chunk overlap r(C) (padding and neighbour boundaries), and bpb(alpha)."""

import math

import numpy as np
import pytest

from retro_jax.leakage import (
    ALPHAS,
    LeakageHistogram,
    bits_per_byte,
    chunk_overlap,
    chunk_sums,
    longest_common_run,
)


def brute_force_run(a, b, pad=None):
    """Longest common substring of two sequences, by trying every start pair."""
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            length = 0
            while (
                i + length < len(a)
                and j + length < len(b)
                and a[i + length] == b[j + length]
                and a[i + length] != pad
            ):
                length += 1
            best = max(best, length)
    return best


def brute_force_bpb(nll, mask, nbytes):
    """Bits per byte token by token: each scored token's nats in bits, over the scored bytes."""
    scored = [(i, j) for i in range(nll.shape[0]) for j in range(nll.shape[1]) if mask[i, j]]
    total_bytes = sum(int(nbytes[i, j]) for i, j in scored)
    if not total_bytes:
        return None
    return sum(nll[i, j] / math.log(2) for i, j in scored) / total_bytes


def test_bits_per_byte_is_nats_over_ln2_over_scored_bytes():
    """Evaluation sums the scored tokens' nats and bytes, then calls bits_per_byte."""
    rng = np.random.default_rng(0)
    nll = rng.random((3, 10)) * 5
    mask = (rng.random((3, 10)) < 0.7).astype(np.float32)
    nbytes = rng.integers(0, 5, (3, 10))
    expected = brute_force_bpb(nll, mask, nbytes)
    got = bits_per_byte(float(np.sum(nll * mask)), float(np.sum(nbytes * mask)))
    assert got == pytest.approx(expected, rel=1e-12)
    assert bits_per_byte(float(np.sum(nll)), 0.0) is None


@pytest.mark.parametrize("alphabet", [2, 4, 30])
def test_longest_common_run_matches_brute_force(alphabet):
    rng = np.random.default_rng(alphabet)
    a = rng.integers(0, alphabet, (40, 8))
    b = rng.integers(0, alphabet, (40, 13))
    expected = [brute_force_run(list(x), list(y)) for x, y in zip(a, b)]
    np.testing.assert_array_equal(longest_common_run(a, b), expected)


def test_longest_common_run_whole_chunk_and_negatives_never_match():
    a = np.array([[5, 6, 7, 8], [-1, -1, 3, 4]])
    b = np.array([[0, 5, 6, 7, 8, 9], [-1, -1, 3, 0, 0, 0]])
    np.testing.assert_array_equal(longest_common_run(a, b), [4, 1])


def test_chunk_overlap_matches_brute_force_per_neighbour():
    rng = np.random.default_rng(1)
    batch, chunks, k, m, pad = 3, 4, 3, 6, 0
    tokens = rng.integers(0, 4, (batch, chunks * m))  # small alphabet: long shared runs, pads
    neighbours = rng.integers(0, 4, (batch, chunks, k, 2 * m))
    tokens[0, m : 2 * m] = rng.integers(1, 4, m)  # a chunk without padding, copied whole:
    neighbours[0, 1, 2, 3 : 3 + m] = tokens[0, m : 2 * m]
    expected = np.zeros((batch, chunks), int)
    for b in range(batch):
        for u in range(chunks):
            chunk = list(tokens[b, u * m : (u + 1) * m])
            expected[b, u] = max(
                brute_force_run(chunk, list(neighbours[b, u, j]), pad=pad) for j in range(k)
            )
    got = chunk_overlap(tokens, neighbours, pad)
    np.testing.assert_array_equal(got, expected)
    assert got[0, 1] == m


def test_chunk_overlap_padding_and_boundaries_do_not_count():
    pad = 0
    tokens = np.array([[7, 8, 0, 0]])  # m = 4: a chunk cut short by its document's end
    neighbours = np.array([[[[1, 1, 1, 7, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]]])
    # "7 | 8" only across the boundary between neighbours 0 and 1; pads match no pads.
    assert chunk_overlap(tokens, neighbours, pad)[0, 0] == 1
    neighbours[0, 0, 1, :2] = [7, 8]
    assert chunk_overlap(tokens, neighbours, pad)[0, 0] == 2


def test_leakage_curve_equals_filtering_chunks_directly():
    rng = np.random.default_rng(2)
    batch, m, chunks = 5, 8, 4
    n = m * chunks
    overlap = rng.integers(0, m + 1, (batch, chunks))
    mask = (rng.random((batch, n)) < 0.8).astype(np.float32)
    mask[0, :m] = 0  # a chunk with nothing scored is not counted
    nbytes = rng.integers(1, 4, (batch, n))
    nll = {"a": rng.random((batch, n)) * 3, "b": rng.random((batch, n)) * 4}
    histogram = LeakageHistogram(m, ["a", "b"])
    histogram.add(overlap[:2], mask[:2], nbytes[:2], {k: v[:2] for k, v in nll.items()})
    histogram.add(overlap[2:], mask[2:], nbytes[2:], {k: v[2:] for k, v in nll.items()})
    rows = histogram.curve(ALPHAS)
    assert [r["alpha"] for r in rows] == list(ALPHAS)
    chunk_mask = chunk_sums(mask, m) > 0
    for row in rows:
        keep = (overlap / m <= row["alpha"] + 1e-12) & chunk_mask  # [B, l]
        token_keep = np.repeat(keep, m, axis=1) * mask
        assert row["chunks"] == keep.sum()
        for mode in ("a", "b"):
            expected = brute_force_bpb(nll[mode], token_keep, nbytes)
            got = row[f"{mode}_bpb"]
            assert (got is None and expected is None) or got == pytest.approx(expected)
    assert rows[-1]["chunks"] == chunk_mask.sum()
    assert rows[-1]["a_bpb"] == pytest.approx(brute_force_bpb(nll["a"], mask, nbytes))


def test_paired_standard_error_matches_a_bootstrap_over_chunks():
    """The standard error of bpb(a) - bpb(ref) over a bucket is the spread of that difference
    when the bucket's chunks are resampled; 0 for a mode equal to the reference."""
    rng = np.random.default_rng(4)
    batch, m, chunks = 100, 4, 8
    n = m * chunks
    overlap = rng.integers(0, m + 1, (batch, chunks))
    mask = (rng.random((batch, n)) < 0.9).astype(np.float32)
    nbytes = rng.integers(1, 5, (batch, n))
    ref = rng.gamma(2.0, 1.0, (batch, n))
    nll = {"ref": ref, "a": ref + rng.normal(0.1, 0.8, (batch, n)), "same": ref.copy()}
    histogram = LeakageHistogram(m, ["a", "same", "ref"], reference="ref")
    for half in (slice(0, 50), slice(50, None)):
        histogram.add(overlap[half], mask[half], nbytes[half], {k: v[half] for k, v in nll.items()})
    rows = histogram.curve(ALPHAS)
    assert "ref_se" not in rows[-1]
    keep = (overlap <= m // 2).ravel()  # alpha = 1/2
    per_chunk = {k: chunk_sums(v * mask, m).ravel()[keep] for k, v in nll.items()}
    chunk_bytes = chunk_sums(nbytes * mask, m).ravel()[keep]
    draws = rng.integers(0, keep.sum(), (4000, keep.sum()))
    diffs = (per_chunk["a"][draws] - per_chunk["ref"][draws]).sum(1) / chunk_bytes[draws].sum(1)
    half = next(r for r in rows if r["alpha"] == 0.5)
    assert half["a_se"] == pytest.approx(diffs.std() / math.log(2), rel=0.1)
    assert half["same_se"] == pytest.approx(0.0, abs=1e-12)
    merged = LeakageHistogram(m, ["a", "same", "ref"], reference="ref")
    merged.load_arrays(histogram.arrays())
    assert merged.curve(ALPHAS) == rows
    empty = LeakageHistogram(m, ["a", "ref"], reference="ref")
    empty.add(
        np.zeros((1, 1), int),
        np.ones((1, m)),
        np.ones((1, m)),
        {"a": ref[:1, :m], "ref": ref[:1, :m]},
    )
    assert empty.curve()[-1]["a_se"] is None  # one chunk: no spread to measure
    with pytest.raises(ValueError, match="reference 'b' is not one of the modes"):
        LeakageHistogram(m, ["a"], reference="b")


def test_histogram_arrays_round_trip_and_sum_like_hosts():
    rng = np.random.default_rng(3)
    m = 4
    parts = []
    for _host in range(2):
        h = LeakageHistogram(m, ["x"])
        h.add(
            rng.integers(0, m + 1, (2, 3)),
            np.ones((2, 12)),
            np.ones((2, 12)),
            {"x": rng.random((2, 12))},
        )
        parts.append(h)
    merged = LeakageHistogram(m, ["x"])
    merged.load_arrays(parts[0].arrays() + parts[1].arrays())
    assert merged.curve()[-1]["chunks"] == 12
    total_bits = sum(p.nll["x"].sum() for p in parts) / math.log(2)
    assert merged.curve()[-1]["x_bpb"] == pytest.approx(total_bits / 48)


def test_only_the_neighbours_read_count():
    """r(C) over the first k neighbours, the ones RETRO reads: a chunk whose 3rd stored
    neighbour holds a copy of it, but whose first two share nothing, is a low-alpha chunk for
    k = 2 (and a full copy if all K = 4 stored neighbours counted)."""
    m, pad = 8, 0
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 50, (1, 2 * m))
    neighbours = rng.integers(100, 200, (1, 2, 4, 2 * m))  # no token in common with the chunks
    neighbours[0, 0, 2, 3 : 3 + m] = tokens[0, :m]  # chunk 0: copied by neighbour 3 of 4
    neighbours[0, 1, 1, :2] = tokens[0, m : m + 2]  # chunk 1: 2 tokens shared by neighbour 2
    np.testing.assert_array_equal(chunk_overlap(tokens, neighbours, pad, k=2), [[0, 2]])
    np.testing.assert_array_equal(chunk_overlap(tokens, neighbours, pad, k=3), [[m, 2]])
    np.testing.assert_array_equal(chunk_overlap(tokens, neighbours, pad), [[m, 2]])
    histogram = LeakageHistogram(m, ["x"])
    ones = np.ones((1, 2 * m))
    histogram.add(chunk_overlap(tokens, neighbours, pad, k=2), ones, ones, {"x": ones})
    rows = {r["alpha"]: r["chunks"] for r in histogram.curve()}
    assert rows[0.0] == 1 and rows[0.25] == 2  # chunk 0 in the alpha = 0 bucket
