"""The RETRO model: a decoder with chunked cross-attention into encoded neighbours.

Decoder layer i (1-based) is LM(H) = FFW(ATTN(H)), or RETRO(H, E) = FFW(CCA(ATTN(H), E)) when
i is in `cca_layers`; all residual and pre-norm. Decoder weights are stacked along a leading
`layers` axis, so the baseline twin's parameters are exactly RETRO's decoder parameters, and with
`scan_layers` the plain layers before the first CCA layer, the evenly spaced blocks [plain layers,
CCA layer] after it and the plain layers after the last each run as one `lax.scan`: the compiled
program holds a handful of layer bodies whatever the depth.

Call: `Retro(config, rngs=...)(tokens [B, n], neighbours [B, n // m, k, 2m] | None)` -> float32
logits [B, n, vocab]. `neighbours=None` switches retrieval off (CCA is the identity).
`token_nll(tokens, neighbours, targets)` -> the per-token loss [B, n], the logits made
`logits_chunk` positions at a time (what training and evaluation call).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.errors import RetroError
from retro_jax.model.attention import self_attention
from retro_jax.model.cca import chunked_cross_attention, neighbour_match, running_match
from retro_jax.model.config import RetroConfig
from retro_jax.model.encoder import NeighbourEncoder, attention_params, values
from retro_jax.model.layers import (
    DTYPES,
    dense_wide,
    embed_lookup,
    feed_forward,
    layer_params,
    param,
    rms_norm,
)
from retro_jax.sharding import constrain


def attention_block(p: dict, x: jax.Array, positions, token_mask, c: RetroConfig) -> jax.Array:
    """x + ATTN(norm(x)): causal self-attention of one decoder layer."""
    h = rms_norm(x, p["attn_norm"], c.norm_eps)
    return x + self_attention(
        p["attn"], h, positions, token_mask, causal=True, rope_base=c.rope_base
    )


def ffw_block(p: dict, x: jax.Array, c: RetroConfig) -> jax.Array:
    """x + FFW(norm(x))."""
    h = rms_norm(x, p["ffw_norm"], c.norm_eps)
    return x + feed_forward(h, p["w_in"], p["w_out"], c.activation)


def decoder_layer(p: dict, x: jax.Array, positions, token_mask, c: RetroConfig) -> jax.Array:
    x = attention_block(p, x, positions, token_mask, c)
    x = ffw_block(p, x, c)
    return constrain(x, ("batch", "length", "act_embed"))


class Retro(nnx.Module):
    """RETRO decoder + neighbour encoder. With `config.cca_layers == ()`, the baseline twin."""

    def __init__(self, config: RetroConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        L, d = (c.num_layers,), c.d_model
        self.embed = param(rngs, (c.vocab_size, d), ("table", "embed"), fan_in=d)
        # Decoder layers, stacked: [layers, ...].
        self.decoder = nnx.Dict(
            attn=nnx.Dict(attention_params(rngs, L, d, d, c.num_heads, c.head_dim, "heads")),
            attn_norm=param(None, (*L, d), ("layers", "norm"), value=1.0),
            ffw_norm=param(None, (*L, d), ("layers", "norm"), value=1.0),
            w_in=param(rngs, (*L, d, c.d_ff), ("layers", "embed", "mlp"), fan_in=d),
            w_out=param(rngs, (*L, c.d_ff, d), ("layers", "mlp", "embed"), fan_in=c.d_ff),
        )
        self.final_norm = param(None, (d,), ("norm",), value=1.0)
        if not c.tie_embeddings:
            self.head = param(rngs, (d, c.vocab_size), ("embed", "vocab"), fan_in=d)
        if c.cca_layers:
            self.encoder = NeighbourEncoder(c, rngs=rngs)
            C = (len(c.cca_layers),)
            attn = attention_params(
                rngs,
                C,
                d,
                c.enc_d_model,
                c.num_heads,
                c.head_dim,
                "heads",
                zero_output=c.cca_zero_init,
            )
            if c.cca_sink:
                attn["sink"] = param(None, (*C, c.num_heads), ("layers", "heads"), value=0.0)
            options = {"match_bias": c.cca_match_bias, "running_bias": c.cca_running_match}
            for name in [name for name, used in options.items() if used]:
                attn[name] = param(None, (*C, c.num_heads), ("layers", "heads"), value=0.0)
            self.cca = nnx.Dict(
                attn=nnx.Dict(attn),
                norm=param(None, (*C, d), ("layers", "norm"), value=1.0),
            )

    # -- pieces shared with incremental decoding (retro_jax/sample.py) --------------------------

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        dtype = DTYPES[self.config.dtype]
        return embed_lookup(self.embed[...], tokens, dtype, ("batch", "length", "act_embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = rms_norm(x, self.final_norm[...], c.norm_eps)
        head = self.embed[...].T if c.tie_embeddings else self.head[...]
        logits = dense_wide(x, head).astype(jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def run_layers(
        self, x: jax.Array, stack: dict, layer_fn: Callable, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Apply the decoder layers [start, stop) of `stack` (params with a leading layers axis)
        in order with `layer_fn(params_i, x)`: one `lax.scan` with `scan_layers`, else unrolled.

        Unrolled, layer i's weights are `a[i]` of the whole stack, however the layers are
        grouped: the backward pass then gathers the stack's gradient from single-layer pieces
        alike in RETRO and its baseline. Slices of slices (a[0:5][i]) made XLA:CPU assemble it in
        pad + add passes over the whole [layers, ...] arrays instead: 0.15 s of op time in a
        172m RETRO step, 0.05 s now (benchmarks/results/model.md)."""
        stop = jax.tree.leaves(stack)[0].shape[0] if stop is None else stop
        if stop <= start:
            return x
        c = self.config
        fn = jax.checkpoint(layer_fn) if c.remat else layer_fn
        if c.scan_layers:
            part = jax.tree.map(lambda a: a[start:stop], stack)
            x, _ = jax.lax.scan(lambda h, p: (fn(p, h), None), x, part)
            return x
        for i in range(start, stop):
            x = fn(layer_params(stack, i), x)
        return x

    # -- forward ------------------------------------------------------------------------------

    def __call__(self, tokens: jax.Array, neighbours: jax.Array | None = None) -> jax.Array:
        """tokens int [B, n]; neighbours int [B, n // m, k, 2m] or None -> logits f32 [B, n, V]."""
        return self.logits(self.hidden(tokens, neighbours))

    def token_nll(
        self, tokens: jax.Array, neighbours: jax.Array | None, targets: jax.Array
    ) -> jax.Array:
        """Negative log-likelihood (nats) of `targets` int [B, n] -> float32 [B, n].

        The loss is logsumexp minus the target's logit: no [B, n, V] log-probabilities. With
        `logits_chunk` = c, the logits themselves are made c positions at a time inside a scan
        and recomputed in the backward pass: [B, c, V] at a time instead of [B, n, V] (at the
        paper's 128k vocabulary and n = 2048, 1 GiB per sequence in float32).
        """
        x = self.hidden(tokens, neighbours)
        batch, n, d = x.shape
        c = self.config.logits_chunk or n

        def nll(x, targets):
            logits = self.logits(x)
            target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jax.nn.logsumexp(logits, axis=-1) - target

        if c >= n:
            return nll(x, targets)
        if n % c:
            raise RetroError(f"model.logits_chunk {c} does not divide the sequence length {n}")
        pieces = (x.reshape(batch, n // c, c, d), targets.reshape(batch, n // c, c))
        pieces = jax.tree.map(lambda a: a.swapaxes(0, 1), pieces)
        _, out = jax.lax.scan(lambda _, p: (None, jax.checkpoint(nll)(*p)), None, pieces)
        return out.swapaxes(0, 1).reshape(batch, n)

    def hidden(self, tokens: jax.Array, neighbours: jax.Array | None = None) -> jax.Array:
        """The decoder's output before the final norm and the vocabulary projection: [B, n, d]."""
        c = self.config
        batch, n = tokens.shape
        m = c.chunk_size
        if neighbours is not None and c.cca_layers:
            want = (batch, n // m, None, 2 * m)
            ok = neighbours.ndim == 4 and all(
                w in (None, s) for w, s in zip(want, neighbours.shape)
            )
            if not ok:
                raise RetroError(
                    f"neighbours must be [batch={batch}, chunks={n // m}, k, 2m={2 * m}], "
                    f"got {tuple(neighbours.shape)}"
                )
        positions = np.arange(n)  # static: rope's tables are constants
        token_mask = tokens != c.pad_id  # [B, n]
        x = self.embed_tokens(tokens)

        def layer(p, h):
            return decoder_layer(p, h, positions, token_mask, c)

        stacked = values(self.decoder)

        retrieve = neighbours is not None and bool(c.cca_layers) and n >= m
        if not retrieve:
            return self.run_layers(x, stacked, layer)

        cca = values(self.cca)
        checkpoint = jax.checkpoint if c.remat else (lambda f: f)

        @checkpoint
        def attention_half(p, x):
            return attention_block(p, x, positions, token_mask, c)

        match = neighbour_match(tokens, neighbours, m, c.pad_id) if c.cca_match_bias else None
        running = None
        if c.cca_running_match:
            chunks = jnp.arange(neighbours.shape[1])
            running = running_match(
                tokens, neighbours, chunks, jnp.arange(m), c.cca_running_match, m, c.pad_id
            )

        @checkpoint
        def cca_and_ffw_half(p, p_cca, x, encoded, neighbour_mask):
            h = rms_norm(x, p_cca["norm"], c.norm_eps)
            x = x + chunked_cross_attention(
                p_cca["attn"],
                h,
                encoded,
                neighbour_mask,
                chunk_size=m,
                rope_base=c.rope_base,
                match=match,
                running=running,
            )
            return ffw_block(p, x, c)

        def retro_block(x, stack, start, stop, p_cca, encoded, neighbour_mask):
            """Decoder layers [start, stop) of `stack`: the plain layers but the last, then the
            last one's ATTN, CCA, FFW."""
            x = self.run_layers(x, stack, layer, start, stop - 1)
            p = layer_params(stack, stop - 1)
            return cca_and_ffw_half(p, p_cca, attention_half(p, x), encoded, neighbour_mask)

        # Up to the first CCA layer: encode there, conditioned on its post-attention activations.
        first = c.cca_layers[0]
        x = self.run_layers(x, stacked, layer, 0, first - 1)
        p = layer_params(stacked, first - 1)
        x = attention_half(p, x)
        encoded, neighbour_mask = checkpoint(self.encode)(neighbours, x, token_mask)
        x = cca_and_ffw_half(p, layer_params(cca, 0), x, encoded, neighbour_mask)

        # The later CCA layers, each with the plain layers before it: a block. The paper places
        # them evenly (every 3rd layer), so with scan_layers the blocks are one scan over
        # [blocks, spacing, ...] decoder params and [blocks, ...] CCA params.
        later = c.cca_layers[1:]
        spacing = {j - i for i, j in zip(c.cca_layers, later)}
        if c.scan_layers and len(spacing) == 1:
            (s,) = spacing
            blocks = jax.tree.map(
                lambda a: a[first : later[-1]].reshape(len(later), s, *a.shape[1:]), stacked
            )
            x, _ = jax.lax.scan(
                lambda h, ps: (retro_block(h, ps[0], 0, s, ps[1], encoded, neighbour_mask), None),
                x,
                (blocks, jax.tree.map(lambda a: a[1:], cca)),
            )
        else:
            for j, (prev, i) in enumerate(zip(c.cca_layers, later), start=1):
                x = retro_block(x, stacked, prev, i, layer_params(cca, j), encoded, neighbour_mask)
        return self.run_layers(x, stacked, layer, c.cca_layers[-1])

    def encode(self, neighbours: jax.Array, x: jax.Array, token_mask: jax.Array):
        """Encode neighbours [B, l, k, 2m] of the complete chunks of x [B, n, d].

        Returns (encoded [B, l, k, 2m, d_enc], mask bool [B, l, k, 2m]).
        """
        m = self.config.chunk_size
        batch, n, d = x.shape
        chunks = n // m
        neighbours = neighbours[:, :chunks]
        chunk_h = x[:, : chunks * m].reshape(batch, chunks, m, d)
        chunk_mask = token_mask[:, : chunks * m].reshape(batch, chunks, m)
        encoded = self.encoder(neighbours, chunk_h, chunk_mask)
        return encoded, neighbours != self.config.pad_id
