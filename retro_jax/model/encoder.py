"""The neighbour encoder: a small bidirectional transformer over each [chunk, continuation].

All neighbours of all chunks are encoded in one batched call with shared weights. At the layers
in `enc_cross_layers` (the first by default) each neighbour of chunk C_u cross-attends to the
decoder activations of C_u itself (unshifted), so the encoding depends only on C_u's tokens and
the neighbours: causality is kept by the CCA shift, not here.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from retro_jax.model.attention import cross_attention, self_attention
from retro_jax.model.config import RetroConfig
from retro_jax.model.layers import (
    DTYPES,
    embed_lookup,
    feed_forward,
    layer_params,
    param,
    rms_norm,
)


def attention_params(
    rngs: nnx.Rngs,
    stack: tuple[int, ...],
    d_q: int,
    d_kv: int,
    heads: int,
    head_dim: int,
    heads_axis: str,
    *,
    zero_output: bool = False,
) -> dict[str, nnx.Param]:
    """q/k/v/o of an attention layer, with leading `stack` axes (layers) if any; with
    `zero_output` the output projection o starts at zero (the layer first adds nothing)."""
    lead = ("layers",) * len(stack)
    return dict(
        q=param(
            rngs, (*stack, d_q, heads, head_dim), (*lead, "embed", heads_axis, "kv"), fan_in=d_q
        ),
        k=param(
            rngs, (*stack, d_kv, heads, head_dim), (*lead, "embed", heads_axis, "kv"), fan_in=d_kv
        ),
        v=param(
            rngs, (*stack, d_kv, heads, head_dim), (*lead, "embed", heads_axis, "kv"), fan_in=d_kv
        ),
        o=param(
            rngs,
            (*stack, heads, head_dim, d_q),
            (*lead, heads_axis, "kv", "embed"),
            fan_in=heads * head_dim,
            value=0.0 if zero_output else None,
        ),
    )


def values(tree) -> dict:
    """Plain arrays of a (nested) dict of nnx.Params."""
    return jax.tree.map(lambda p: p[...], tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class NeighbourEncoder(nnx.Module):
    """Bidirectional encoder of neighbours [B, l, k, r], conditioned on chunks [B, l, m, d]."""

    def __init__(self, config: RetroConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        layers, de, d = (c.enc_num_layers,), c.enc_d_model, c.d_model
        self.embed = param(rngs, (c.vocab_size, de), ("table", "embed"), fan_in=de)
        # Encoder heads stay replicated ("kv" rule): 14 heads of the paper's width need not divide
        # the tensor axis, and the encoder is ~19M parameters.
        self.attn = nnx.Dict(
            attention_params(rngs, layers, de, de, c.enc_num_heads, c.enc_head_dim, "kv")
        )
        self.attn_norm = param(None, (*layers, de), ("layers", "norm"), value=1.0)
        crosses = (len(c.enc_cross_layers),)
        self.cross = nnx.Dict(
            attention_params(rngs, crosses, de, d, c.enc_num_heads, c.enc_head_dim, "kv")
        )
        self.cross_norm = param(None, (*crosses, de), ("layers", "norm"), value=1.0)
        self.context_norm = param(None, (d,), ("norm",), value=1.0)
        self.ffw_norm = param(None, (*layers, de), ("layers", "norm"), value=1.0)
        self.w_in = param(rngs, (*layers, de, c.enc_d_ff), ("layers", "embed", "mlp"), fan_in=de)
        self.w_out = param(
            rngs, (*layers, c.enc_d_ff, de), ("layers", "mlp", "embed"), fan_in=c.enc_d_ff
        )
        self.final_norm = param(None, (de,), ("norm",), value=1.0)

    def __call__(
        self, neighbours: jax.Array, chunk_h: jax.Array, chunk_mask: jax.Array
    ) -> jax.Array:
        """neighbours int [B, l, k, r]; chunk_h [B, l, m, d]; chunk_mask bool [B, l, m].

        Returns the encodings [B, l, k, r, d_enc] in the compute dtype.
        """
        c = self.config
        dtype = DTYPES[c.dtype]
        r = neighbours.shape[-1]
        mask = neighbours != c.pad_id  # [B, l, k, r]
        names = ("batch", "chunks", "neighbours", "length", "act_embed")
        x = embed_lookup(self.embed[...], neighbours, dtype, names)  # [B, l, k, r, de]
        positions = np.arange(r)  # static: rope's tables are constants
        # Each neighbour of chunk u attends to C_u. The k neighbours of a chunk share its keys,
        # so their tokens are one query sequence of k*r (RoPE positions 0..r-1 each): one
        # [k*r, D] x [D, m] product per chunk and head instead of k [r, D] x [D, m] over keys
        # broadcast to every neighbour (benchmarks/results/model.md, session 26).
        context = rms_norm(chunk_h.astype(dtype), self.context_norm[...], c.norm_eps)
        k = neighbours.shape[-2]
        cross_positions = np.tile(positions, k)  # [k*r]
        attn, cross = values(self.attn), values(self.cross)
        for i in range(c.enc_num_layers):
            p = layer_params(attn, i)
            h = rms_norm(x, self.attn_norm[i], c.norm_eps)
            x = x + self_attention(p, h, positions, mask, causal=False, rope_base=c.rope_base)
            if i + 1 in c.enc_cross_layers:
                j = c.enc_cross_layers.index(i + 1)
                p = layer_params(cross, j)
                h = rms_norm(x, self.cross_norm[j], c.norm_eps)
                y = cross_attention(
                    p,
                    h.reshape(*h.shape[:2], k * r, h.shape[-1]),  # [B, l, k*r, de]
                    context,
                    q_positions=cross_positions,
                    k_positions=np.arange(context.shape[-2]),
                    key_mask=chunk_mask,
                    rope_base=c.rope_base,
                )
                x = x + y.reshape(x.shape)
            h = rms_norm(x, self.ffw_norm[i], c.norm_eps)
            x = x + feed_forward(h, self.w_in[i], self.w_out[i], c.activation)
        return rms_norm(x, self.final_norm[...], c.norm_eps)
