"""Chunked cross-attention against the paper, as properties that the known pitfalls break:
the alignment of each position with its chunk, one softmax over all k*2m neighbour tokens,
distinct rotary query positions m-1+j and neighbour positions restarting at 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.model import RetroConfig
from retro_jax.model.attention import cross_attention
from retro_jax.model.cca import chunked_cross_attention
from retro_jax.model.encoder import NeighbourEncoder, attention_params, values

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

M, D, DE, K = 4, 16, 12, 3  # chunk size, decoder width, encoder width, neighbours
R = 2 * M


@pytest.fixture(scope="module")
def params():
    return values(nnx.Dict(attention_params(nnx.Rngs(0), (), D, DE, 2, 8, "heads")))


def inputs(seed, n=5 * M - 1, chunks=5):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(2, n, D)), jnp.float32)
    encoded = jnp.asarray(rng.normal(size=(2, chunks, K, R, DE)), jnp.float32)
    mask = jnp.asarray(rng.random((2, chunks, K, R)) < 0.8)
    return h, encoded, mask


reference = jax.jit(cross_attention, static_argnames="rope_base")


def cca(p, h, encoded, mask):
    return chunked_cross_attention(p, h, encoded, mask, chunk_size=M, rope_base=10_000.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_position_attends_to_the_chunk_that_ended_before_it(params, seed):
    """Position i >= m-1 is query j = (i-m+1) % m of H_u+, u = (i-m+1) // m: it attends to
    E_u alone, at rotary position m-1+j; positions 0..m-2 get nothing. Computed one position at
    a time with the same attention primitive; n is not a multiple of m (a trailing partial
    chunk)."""
    h, encoded, mask = inputs(seed)
    out = np.asarray(cca(params, h, encoded, mask))
    n = h.shape[1]
    np.testing.assert_array_equal(out[:, : M - 1], 0.0)
    for i in range(M - 1, n):
        u, j = divmod(i - (M - 1), M)
        expected = reference(
            params,
            h[:, i : i + 1],
            encoded[:, u].reshape(2, K * R, DE),
            q_positions=jnp.array([M - 1 + j]),
            k_positions=jnp.tile(jnp.arange(R), K),
            key_mask=mask[:, u].reshape(2, K * R),
            rope_base=10_000.0,
        )
        np.testing.assert_allclose(out[:, i], np.asarray(expected)[:, 0], atol=1e-5, err_msg=i)


def test_one_softmax_over_all_neighbour_tokens(params):
    """Duplicating every neighbour leaves a joint softmax unchanged (each copy gets half the
    weight); a softmax per neighbour, summed, would double the output."""
    h, encoded, mask = inputs(3)
    twice = cca(params, h, jnp.concatenate([encoded, encoded], 2), jnp.concatenate([mask] * 2, 2))
    np.testing.assert_allclose(
        np.asarray(twice), np.asarray(cca(params, h, encoded, mask)), atol=1e-5
    )


def test_neighbour_order_does_not_matter(params):
    """Each neighbour's tokens sit at positions 0..2m-1 whatever its rank: permuting the k
    neighbours changes nothing (with positions running on across neighbours it would)."""
    h, encoded, mask = inputs(4)
    order = jnp.array([2, 0, 1])
    permuted = cca(params, h, encoded[:, :, order], mask[:, :, order])
    np.testing.assert_allclose(
        np.asarray(permuted), np.asarray(cca(params, h, encoded, mask)), atol=1e-5
    )


def test_queries_of_a_chunk_have_distinct_positions(params):
    """The m queries of H_u+ sit at m-1 ... 2m-2: equal activations at different positions
    give different outputs (a known port collapses them to one position)."""
    h, encoded, mask = inputs(5, n=3 * M, chunks=3)
    h = jnp.broadcast_to(h[:, :1], h.shape)  # the same activation everywhere
    out = np.asarray(cca(params, h, encoded, jnp.ones_like(mask)))
    block = out[:, M - 1 : 2 * M - 1]  # H_0+: queries j = 0..m-1 of the first chunk
    for j in range(1, M):
        assert np.abs(block[:, j] - block[:, 0]).max() > 1e-4, j


def test_a_sink_is_one_more_key_of_value_zero(params):
    """RetroConfig.cca_sink: each head's sink logit s acts as one more key with value zero, so
    the output is the no-sink output scaled per query and head by Z / (Z + e^s) (Z the sum of
    the query's exp-logits); a sink of -inf changes nothing, and fully padded neighbours still
    give exactly zero."""
    from retro_jax.model.attention import attend

    rng = np.random.default_rng(5)
    q, k, v = (
        jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in [(3, 2, 8), (6, 2, 8), (6, 2, 8)]  # [Tq | Tk, H, D]
    )
    mask = jnp.asarray(rng.random((1, 3, 6)) < 0.7).at[:, 0].set(True)
    sink = jnp.asarray([0.5, -1.0])
    logits = np.einsum("qhd,khd->hqk", np.asarray(q) * 8**-0.5, np.asarray(k))
    z = np.sum(np.where(np.asarray(mask), np.exp(logits), 0.0), axis=-1)  # [H, Tq]
    scale = (z / (z + np.exp(np.asarray(sink))[:, None])).T[..., None]  # [Tq, H, 1]
    np.testing.assert_allclose(
        attend(q, k, v, mask, sink), attend(q, k, v, mask) * scale, atol=1e-5
    )
    np.testing.assert_allclose(
        attend(q, k, v, mask, jnp.full(2, -jnp.inf)), attend(q, k, v, mask), atol=1e-6
    )
    h, encoded, nmask = inputs(4)
    with_sink = dict(params, sink=jnp.asarray([2.0, -2.0]))
    out = cca(with_sink, h, encoded, jnp.zeros_like(nmask))
    assert not np.isnan(np.asarray(out)).any() and (np.asarray(out) == 0).all()
    assert (
        np.abs(np.asarray(cca(with_sink, h, encoded, nmask) - cca(params, h, encoded, nmask))).max()
        > 1e-3
    )


@pytest.mark.parametrize("mask_shape", [(2, 3, 1, 1, 6), (5, 6), (2, 3, 4, 5, 6)])
def test_attend_is_a_masked_softmax_with_a_sink_and_a_bias(mask_shape):
    """attend (normalised after the weighted sum) equals softmax(logits + bias) over the valid
    keys and one zero-valued sink key, times v; a query with no valid key gets exactly zero;
    masks of any rank that broadcasts to the logits [..., H, Tq, Tk]."""
    from retro_jax.model.attention import attend

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 3, 5, 4, 8)), jnp.float32)  # [B, l, Tq, H, D]
    k, v = (jnp.asarray(rng.normal(size=(2, 3, 6, 4, 8)), jnp.float32) for _ in range(2))
    mask = rng.random(mask_shape) < 0.6
    mask[..., 0, :] = False  # the first query (or every query) has no valid key
    mask = jnp.asarray(mask)
    sink = jnp.asarray(rng.normal(size=4), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 6)), jnp.float32)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(8) + bias
    full = jnp.broadcast_to(mask, logits.shape)
    for with_sink in (False, True):
        column = jnp.broadcast_to(sink[:, None, None], (*logits.shape[:-1], 1))
        extra = [column] if with_sink else []
        masked = jnp.where(full, logits, -jnp.inf)
        weights = jax.nn.softmax(jnp.concatenate([masked, *extra], axis=-1), axis=-1)
        weights = jnp.nan_to_num(weights[..., : logits.shape[-1]])  # no valid key: zeros
        expected = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        got = attend(q, k, v, mask, sink if with_sink else None, bias)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        empty = ~full.any(-1)  # [B, l, H, Tq]
        assert bool(jnp.all(jnp.where(jnp.swapaxes(empty, -1, -2)[..., None], got, 0.0) == 0))


def test_neighbour_match_and_its_logits(params):
    """RetroConfig.cca_match_bias: neighbour_match is the share of C_u's tokens (padding
    excluded) that the neighbour's first m tokens hold at the same offset, and each head adds
    MATCH_SCALE * match_bias[h] * match to the logits of that neighbour's 2m keys: the same
    output as attention whose keys carry that bias, which the head's logit can make favour
    (or avoid) a neighbour that fits."""
    from retro_jax.model.attention import MATCH_SCALE
    from retro_jax.model.cca import neighbour_match

    rng = np.random.default_rng(11)
    tokens = rng.integers(1, 9, (2, 3 * M)).astype(np.int32)
    tokens[1, :3] = 0  # left padding: not counted
    neighbours = rng.integers(1, 9, (2, 3, K, R)).astype(np.int32)
    neighbours[0, 1, 0, :M] = tokens[0, M : 2 * M]  # a copy: match 1
    got = np.asarray(neighbour_match(jnp.asarray(tokens), jnp.asarray(neighbours), M, 0))
    want = np.zeros((2, 3, K))
    for b, u, j in np.ndindex(*want.shape):
        chunk = tokens[b, u * M : (u + 1) * M]
        real = chunk != 0
        want[b, u, j] = ((neighbours[b, u, j, :M] == chunk) & real).sum() / max(real.sum(), 1)
    np.testing.assert_allclose(got, np.repeat(want, R, axis=-1), rtol=1e-6)  # per key
    assert got[0, 1, 0] == 1.0 and got.max() <= 1.0
    h, encoded, mask = inputs(12, n=3 * M, chunks=3)
    w = jnp.asarray([0.3, -0.2])
    with_bias = dict(params, match_bias=w)
    out = chunked_cross_attention(
        with_bias, h, encoded, mask, chunk_size=M, rope_base=10_000.0, match=jnp.asarray(got)
    )
    assert np.abs(np.asarray(out - cca(params, h, encoded, mask))).max() > 1e-3  # it is used
    key_bias = MATCH_SCALE * np.asarray(w)[None, :, None, None] * got[:, 0][:, None, None, :]
    by_hand = first_chunk_by_hand(params, h, encoded, mask, key_bias)
    np.testing.assert_allclose(out[:, M - 1 : 2 * M - 1], by_hand, atol=1e-5)


def first_chunk_by_hand(params, h, encoded, mask, key_bias):
    """CCA's output at the first attending chunk H_0+ (positions m-1 .. 2m-2), by hand, with
    `key_bias` [B, H, m or 1, k*2m] added to its logits."""
    from retro_jax.model.attention import attend, output, project_qkv
    from retro_jax.model.layers import rope

    q, k, v = project_qkv(params, h[:, M - 1 : 2 * M - 1], encoded[:, 0].reshape(2, K * R, DE))
    q = rope(q, M - 1 + jnp.arange(M), 10_000.0)
    k = rope(k, jnp.tile(jnp.arange(R), K), 10_000.0)
    return output(params, attend(q, k, v, mask[:, 0].reshape(2, 1, 1, K * R), None, key_bias))


def test_running_match_and_its_logits(params):
    """RetroConfig.cca_running_match: for the query at u*m + m-1 + o, running_match is the share
    of its last w tokens (padding and positions outside the sequence excluded, none after the
    query) that the neighbour holds at the same offsets (its token t at u*m + t), and each head
    adds MATCH_SCALE * running_bias[h] * that share to the query's logits of the neighbour's 2m
    keys. Over a window of m at o = 0 it is neighbour_match."""
    from retro_jax.model.attention import MATCH_SCALE
    from retro_jax.model.cca import neighbour_match, running_match

    rng = np.random.default_rng(13)
    tokens = rng.integers(1, 4, (2, 3 * M)).astype(np.int32)  # 3 symbols: many partial matches
    tokens[1, :3] = 0  # left padding: not counted
    neighbours = rng.integers(1, 4, (2, 3, K, R)).astype(np.int32)
    neighbours[0, 0, 0] = tokens[0, :R]  # C_0 and its continuation C_1: a running match of 1
    window, chunks = 3, 3
    got = np.asarray(
        running_match(
            *map(jnp.asarray, (tokens, neighbours)), jnp.arange(chunks), jnp.arange(M), window, M, 0
        )
    )
    want = np.zeros((2, chunks, M, K))
    for b, u, o, j in np.ndindex(*want.shape):
        query = u * M + M - 1 + o
        read = [i for i in range(query - window + 1, query + 1) if 0 <= i < 3 * M]
        read = [i for i in read if tokens[b, i] != 0]
        hits = sum(neighbours[b, u, j, i - u * M] == tokens[b, i] for i in read)
        want[b, u, o, j] = hits / max(len(read), 1)
    np.testing.assert_allclose(got, np.repeat(want, R, axis=-1), rtol=1e-6)  # per key
    assert (got[0, 0, :, 0] == 1).all() and 0 < want.mean() < 1
    at_first = running_match(
        jnp.asarray(tokens), jnp.asarray(neighbours), jnp.arange(chunks), jnp.zeros(1, int), M, M, 0
    )[:, :, 0]
    np.testing.assert_allclose(
        at_first, neighbour_match(jnp.asarray(tokens), jnp.asarray(neighbours), M, 0)
    )
    h, encoded, mask = inputs(14, n=3 * M, chunks=3)
    w = jnp.asarray([0.4, -0.3])
    out = chunked_cross_attention(
        dict(params, running_bias=w),
        h,
        encoded,
        mask,
        chunk_size=M,
        rope_base=10_000.0,
        running=jnp.asarray(got),
    )
    assert np.abs(np.asarray(out - cca(params, h, encoded, mask))).max() > 1e-3  # it is used
    key_bias = MATCH_SCALE * np.asarray(w)[None, :, None, None] * got[:, 0][:, None, :, :]
    by_hand = first_chunk_by_hand(params, h, encoded, mask, key_bias)
    np.testing.assert_allclose(out[:, M - 1 : 2 * M - 1], by_hand, atol=1e-5)


def test_rope_tables_from_static_and_traced_positions_agree_and_rotate():
    """rope with positions known when tracing (NumPy: float64 tables, constants of the program)
    equals rope with traced positions (float32 tables computed in the program), forward and
    gradient; either way it is a rotation (norms kept) whose dot products depend only on the
    positions' difference."""
    from retro_jax.model.layers import rope

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 40, 3, 16)), jnp.float32)  # [B, T, H, D]
    positions = np.arange(40) * 5  # up to 195: float32 angles are no longer exact there
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(x, p):
        return jnp.sum(rope(x, p, 10_000.0) * ct)

    static = jax.jit(lambda x: rope(x, positions, 10_000.0))(x)
    traced = jax.jit(lambda x, p: rope(x, p, 10_000.0))(x, jnp.asarray(positions))
    np.testing.assert_allclose(static, traced, atol=2e-5)
    grad_static = jax.jit(jax.grad(lambda x: loss(x, positions)))(x)
    grad_traced = jax.jit(jax.grad(loss))(x, jnp.asarray(positions))
    np.testing.assert_allclose(grad_static, grad_traced, atol=2e-5)
    np.testing.assert_allclose(
        jnp.linalg.norm(static, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )
    # <rope(q, i), rope(k, j)> depends on i - j only: shift both positions by the same amount
    q, k = x[:, :1], x[:, 1:2]
    for i, j in [(3, 1), (30, 7)]:
        base = jnp.sum(rope(q, np.array([i]), 1e4) * rope(k, np.array([j]), 1e4), axis=-1)
        moved = jnp.sum(rope(q, np.array([i + 50]), 1e4) * rope(k, np.array([j + 50]), 1e4), -1)
        np.testing.assert_allclose(base, moved, atol=1e-4)


def test_encoder_encodes_each_neighbour_from_itself_and_its_own_chunk():
    """The neighbour encoder's k neighbours of a chunk share that chunk's keys in one
    cross-attention over k*r queries (RoPE positions 0..r-1 each): the result must be each
    neighbour encoded alone (k = 1) with its chunk, and a chunk's hidden states must reach only
    its own neighbours' encodings, padded chunk positions none."""
    c = RetroConfig.preset("tiny").replace(enc_cross_layers=(1, 2))
    m, r, k, chunks = c.chunk_size, 2 * c.chunk_size, 3, 3
    rng = np.random.default_rng(3)
    neighbours = rng.integers(1, c.vocab_size, (2, chunks, k, r)).astype(np.int32)
    neighbours[1, 0, 2, r // 2 :] = c.pad_id
    chunk_h = jnp.asarray(rng.normal(size=(2, chunks, m, c.d_model)), jnp.float32)
    chunk_mask = np.ones((2, chunks, m), bool)
    chunk_mask[0, 1, m // 2 :] = False
    encoder = NeighbourEncoder(c, rngs=nnx.Rngs(0))
    graph, state = nnx.split(encoder)
    encode = jax.jit(lambda n, h, mask: nnx.merge(graph, state)(n, h, mask))
    together = encode(neighbours, chunk_h, jnp.asarray(chunk_mask))
    assert together.shape == (2, chunks, k, r, c.enc_d_model)
    for j in range(k):
        alone = encode(neighbours[:, :, j : j + 1], chunk_h, jnp.asarray(chunk_mask))
        np.testing.assert_allclose(together[:, :, j : j + 1], alone, atol=2e-5, rtol=2e-5)
    # Change chunk 1's hidden states: only chunk 1's neighbours change, and not through the
    # positions its mask pads.
    moved = chunk_h.at[:, 1].add(1.0)
    changed = np.abs(np.asarray(encode(neighbours, moved, jnp.asarray(chunk_mask)) - together))
    assert changed[:, 1].max() > 1e-3 and changed[:, [0, 2]].max() == 0.0
    padded_only = chunk_h.at[0, 1, m // 2 :].add(1.0)
    same = encode(neighbours, padded_only, jnp.asarray(chunk_mask))
    np.testing.assert_array_equal(same, together)
