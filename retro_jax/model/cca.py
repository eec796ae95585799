"""Chunked cross-attention (CCA), exactly as the paper's listing (Borgeaud et al., Alg. 1).

With chunk size m and n tokens, the attending chunk H_u+ (0-based u) is positions
u*m + m-1 ... (u+1)*m + m-2: the last token of chunk C_u and the first m-1 tokens of C_{u+1}.
H_u+ attends to E_u, the encoded neighbours of C_u, so no position sees neighbours retrieved with
tokens from its own future, and the last token of each chunk already uses that chunk's
neighbours. The first m-1 positions get no CCA (zero output; the residual keeps them unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model.attention import cross_attention, match_logits


def running_match(
    tokens: jax.Array,
    neighbours: jax.Array,
    chunk_ids: jax.Array,
    offsets: jax.Array,
    window: int,
    m: int,
    pad_id: int,
) -> jax.Array:
    """How well each neighbour still fits the text where a query of H_u+ reads it
    (`RetroConfig.cca_running_match`).

    tokens [B, T] (the sequence so far); neighbours [B, G, k, 2m], those of the chunks
    `chunk_ids` [G]; offsets [Q]: queries by their offset o in H_u+ (position u*m + m-1 + o).
    Returns [B, G, Q, k*2m] float32, per key as CCA lays them out: the share of the query's last
    `window` tokens (u*m + m-1 + o - window + 1 .. u*m + m-1 + o, inside C_u and C_{u+1}; padding
    and positions outside 0..T-1 excluded) that the key's neighbour holds at the same offsets (its
    token t sits at u*m + t, as `retrieval.align_neighbours` aligns it). A query reads no token
    after its own position, so the match is as causal as the query itself.
    """
    r = neighbours.shape[-1]
    t = jnp.arange(r)
    index = jnp.asarray(chunk_ids)[:, None] * m + t  # [G, 2m]: C_u and C_{u+1}
    text = jnp.take(tokens, index, axis=1, mode="clip")  # [B, G, 2m]
    real = (text != pad_id) & (index >= 0) & (index < tokens.shape[1])
    same = ((neighbours == text[:, :, None]) & real[:, :, None]).astype(jnp.float32)
    end = m - 1 + jnp.asarray(offsets)[:, None]  # [Q, 1]: the query's own offset
    read = ((t <= end) & (t > end - window)).astype(jnp.float32)  # [Q, 2m]
    hits = jnp.einsum("bgkr,qr->bgqk", same, read)
    count = jnp.einsum("bgr,qr->bgq", real.astype(jnp.float32), read)
    return jnp.repeat(hits / jnp.maximum(count, 1.0)[..., None], r, axis=-1)


def neighbour_match(tokens: jax.Array, neighbours: jax.Array, m: int, pad_id: int) -> jax.Array:
    """How well each neighbour fits the chunk that retrieved it (`RetroConfig.cca_match_bias`).

    tokens [B, >= l*m], neighbours [B, l, k, 2m] -> [B, l, k*2m] float32, per key as CCA lays
    them out: the share of C_u's tokens (padding excluded) that the key's neighbour holds at the
    same offset in its first m tokens: the `running_match` of H_u+'s first query over a window
    of m, C_u itself.
    With neighbours aligned to their query (retrieval.align_neighbours) a near-duplicate scores
    near 1 and its continuation sits where CCA reads a copy; a neighbour of other text near 0.
    It reads only C_u and its neighbours, which positions u*m + m-1 onwards may see.
    """
    chunks = neighbours.shape[1]
    first = running_match(tokens, neighbours, jnp.arange(chunks), jnp.zeros(1, int), m, m, pad_id)
    return first[:, :, 0]


def chunked_cross_attention(
    p: dict,
    h: jax.Array,
    encoded: jax.Array,
    neighbour_mask: jax.Array,
    *,
    chunk_size: int,
    rope_base: float,
    match: jax.Array | None = None,
    running: jax.Array | None = None,
) -> jax.Array:
    """The CCA update to add to the residual stream.

    h [B, n, d] (normalised decoder activations); encoded [B, l, k, r, d_enc] with l >= n // m
    (the encoded neighbours of each complete chunk, r = 2m tokens each); neighbour_mask bool
    [B, l, k, r] (False on padding); match [B, l, k*r] (`neighbour_match`, with p["match_bias"])
    and running [B, l, m, k*r] (`running_match`, with p["running_bias"]), or None. Returns
    [B, n, d].

    One softmax runs jointly over all k*r neighbour tokens of a chunk. Rotary positions: the j-th
    query of H_u+ sits at m-1+j (its offset from the start of C_u) and each neighbour's tokens at
    0..r-1, so the relative distance is i - i' + m - 1, as in the paper.
    """
    batch, n, d = h.shape
    m = chunk_size
    chunks = n // m  # attending chunks that exist; a trailing partial chunk has no neighbours yet
    if chunks == 0:
        return jnp.zeros_like(h)
    _, _, k, r, d_enc = encoded.shape
    encoded, neighbour_mask = encoded[:, :chunks], neighbour_mask[:, :chunks]

    attending = h[:, m - 1 : m - 1 + chunks * m]  # drop the first m-1 positions
    attending = jnp.pad(attending, ((0, 0), (0, chunks * m - attending.shape[1]), (0, 0)))
    attending = attending.reshape(batch, chunks, m, d)  # [B, l, m, d]

    y = cross_attention(
        p,
        attending,
        encoded.reshape(batch, chunks, k * r, d_enc),
        q_positions=m - 1 + np.arange(m),
        k_positions=np.tile(np.arange(r), k),
        key_mask=neighbour_mask.reshape(batch, chunks, k * r),
        rope_base=rope_base,
        bias=match_logits(
            p,
            None if match is None else match[:, :chunks],
            None if running is None else running[:, :chunks],
        ),
    )  # [B, l, m, d]
    y = y.reshape(batch, chunks * m, d)
    return jnp.pad(y, ((0, 0), (m - 1, 0), (0, 0)))[:, :n]  # back to positions 0..n-1
