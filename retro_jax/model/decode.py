"""Incremental decoding: key/value caches and cached neighbours, fed a prompt at once or one
position per step.

`feed` runs positions pos .. pos+T-1 against the caches: T = 1 is a decoding step, and a whole
prompt is one call (prefill) instead of one step per token. Self-attention reads the cached
keys/values of earlier positions; the neighbours of chunk C_u are encoded once, when its last
token is fed (the paper's order: E_u conditions positions u*m + m-1 onwards), and their CCA
keys/values are cached per chunk. The same pure functions as the full forward pass are used, so
both give the same logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.errors import RetroError
from retro_jax.model.attention import attend, match_logits, output, project, project_qkv
from retro_jax.model.cca import neighbour_match, running_match
from retro_jax.model.encoder import values
from retro_jax.model.layers import DTYPES, feed_forward, rms_norm, rope
from retro_jax.model.retro import Retro
from retro_jax.sharding import logical_to_spec

# Logical axes of the cache entries that are split over a mesh: keys and values split their heads
# like the attention weights (over `tensor`); everything else is replicated (one sequence).
_CACHE_AXES = {
    "k": ("layers", None, "length", "heads", "kv"),
    "v": ("layers", None, "length", "heads", "kv"),
    "cca_k": ("layers", None, "chunks", "neighbours", "heads", "kv"),
    "cca_v": ("layers", None, "chunks", "neighbours", "heads", "kv"),
}


def init_cache(model: Retro, batch: int, max_len: int, num_neighbours: int) -> dict:
    """Empty caches for sequences of up to `max_len` tokens.

    k/v [layers, B, T, H, D]; chunk_h [B, T, d] (decoder activations at the first CCA layer,
    which condition the encoder); cca_k/cca_v [cca_layers, B, chunks, k*2m, H, D]; with
    `cca_match_bias` or `cca_running_match`, tokens [B, T] (the fed ones); with the first,
    cca_match [B, chunks, k*2m] (each key's neighbour's match with its chunk); with the second,
    cca_tokens [B, chunks, k, 2m] (the neighbours, to match where each query reads them).
    """
    c = model.config
    dtype = DTYPES[c.dtype]
    heads = (c.num_heads, c.head_dim)
    cache = {
        "pos": jnp.zeros((), jnp.int32),
        "token_mask": jnp.zeros((batch, max_len), bool),
        "k": jnp.zeros((c.num_layers, batch, max_len, *heads), dtype),
        "v": jnp.zeros((c.num_layers, batch, max_len, *heads), dtype),
    }
    if c.cca_layers:
        chunks, r = max_len // c.chunk_size, 2 * c.chunk_size
        cca = (len(c.cca_layers), batch, chunks, num_neighbours * r, *heads)
        cache |= {
            "chunk_h": jnp.zeros((batch, max_len, c.d_model), dtype),
            "cca_k": jnp.zeros(cca, dtype),
            "cca_v": jnp.zeros(cca, dtype),
            "cca_mask": jnp.zeros((batch, chunks, num_neighbours * r), bool),
        }
        if c.cca_match_bias or c.cca_running_match:
            cache["tokens"] = jnp.zeros((batch, max_len), jnp.int32)
        if c.cca_match_bias:
            cache["cca_match"] = jnp.zeros((batch, chunks, num_neighbours * r), jnp.float32)
        if c.cca_running_match:
            cache["cca_tokens"] = jnp.zeros((batch, chunks, num_neighbours, r), jnp.int32)
    return cache


def _encode_chunks(model: Retro, cache: dict, first: jax.Array, neighbours: jax.Array) -> dict:
    """Encode the neighbours [B, l, k, 2m] of chunks first .. first+l-1 into the CCA caches."""
    c = model.config
    m = c.chunk_size
    batch, chunks, k, r = neighbours.shape
    chunk_h = jax.lax.dynamic_slice_in_dim(cache["chunk_h"], first * m, chunks * m, axis=1)
    chunk_mask = jax.lax.dynamic_slice_in_dim(cache["token_mask"], first * m, chunks * m, axis=1)
    encoded, mask = model.encode(neighbours, chunk_h, chunk_mask)  # [B, l, k, r, de], [B, l, k, r]
    encoded = encoded.reshape(batch, chunks, k * r, -1)
    # Every CCA layer's keys and values at once, from the stacked weights [cca_layers, de, H, D].
    attn = values(model.cca)["attn"]
    project_all = lambda w: jnp.einsum("bltd,jdhk->jblthk", encoded, w.astype(encoded.dtype))
    keys = rope(project_all(attn["k"]), np.tile(np.arange(r), k), c.rope_base)
    put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new, first, axis=axis)
    cache = cache | {
        "cca_k": put(cache["cca_k"], keys, 2),
        "cca_v": put(cache["cca_v"], project_all(attn["v"]), 2),
        "cca_mask": put(cache["cca_mask"], mask.reshape(batch, chunks, k * r), 1),
    }
    if c.cca_match_bias:
        chunk = jax.lax.dynamic_slice_in_dim(cache["tokens"], first * m, chunks * m, axis=1)
        cache["cca_match"] = put(
            cache["cca_match"], neighbour_match(chunk, neighbours, m, c.pad_id), 1
        )
    if c.cca_running_match:
        cache["cca_tokens"] = put(cache["cca_tokens"], neighbours.astype(jnp.int32), 1)
    return cache


def feed(
    model: Retro,
    cache: dict,
    tokens: jax.Array,
    neighbours: jax.Array | None = None,
    length: jax.Array | int | None = None,
    *,
    all_logits: bool = False,
) -> tuple[jax.Array, dict]:
    """Feed `tokens` [B, T] at positions pos .. pos+T-1 (pos = cache['pos']); one step (T = 1)
    or a whole prompt at once (prefill). Returns (logits, cache with pos advanced by `length`).

    `length` (may be traced; default T): only tokens[:, :length] are fed; the rest fill a
    bucketed shape and are ignored (later positions overwrite their cache rows, and no earlier
    position attends to them). Logits: [B, V] after the last fed token, or with `all_logits`
    [B, T, V] after each. `neighbours` [B, l, k, 2m]: those of the l chunks whose last token is
    fed here, in order (chunks pos//m .. pos//m + l-1), or None.

    The layers run in the forward pass's blocks: plain layers, then each CCA layer with the plain
    layers before it. Each run of plain layers is one `fori_loop`, and so are evenly spaced CCA
    blocks (whatever `scan_layers` says: decoding has no backward pass to unroll for), with the
    whole key/value cache in the carry (each layer writes its rows at pos .. pos+T-1 in place) and
    each layer's weights indexed in place from the stacks. A deep model compiles one layer, not
    all of them, and no step copies its weights: a static slice of a stacked weight is a copy on
    XLA:CPU, which made unrolled steps about 3x slower (benchmarks/results/eval_sample.md).
    """
    c = model.config
    m, t = c.chunk_size, cache["pos"]
    batch, n = tokens.shape
    length = n if length is None else length
    max_len = cache["k"].shape[2]
    positions = t + jnp.arange(n)
    x = model.embed_tokens(tokens)  # [B, T, d]
    token_mask = jax.lax.dynamic_update_slice_in_dim(
        cache["token_mask"], tokens != c.pad_id, t, axis=1
    )
    cache = cache | {"token_mask": token_mask}
    if "tokens" in cache:  # the tokens fed, for the neighbours' matches (cca_*_match*)
        fed = tokens.astype(jnp.int32)
        cache["tokens"] = jax.lax.dynamic_update_slice_in_dim(cache["tokens"], fed, t, axis=1)
    # [B, 1, T, max_len]: keys up to each query's own position
    visible = (token_mask[:, None, :] & (jnp.arange(max_len) <= positions[:, None]))[:, None]
    stacked = values(model.decoder)

    def attention(p, x, kv, i):
        """Layer i's ATTN (i may be traced): writes its key/value rows at t.., reads 0..t+T-1."""
        h = rms_norm(x, p["attn_norm"], c.norm_eps)
        q, k, v = project_qkv(p["attn"], h, h)
        q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
        zero = jnp.zeros((), jnp.int32)
        at = (i, zero, t, zero, zero)
        k_all, v_all = (
            jax.lax.dynamic_update_slice(a, new[None], at) for a, new in zip(kv, (k, v))
        )
        y = attend(q, k_all[i], v_all[i], visible)
        return x + output(p["attn"], y), (k_all, v_all)

    def ffw(p, x):
        return x + feed_forward(
            rms_norm(x, p["ffw_norm"], c.norm_eps), p["w_in"], p["w_out"], c.activation
        )

    def layer_params(stack, i):  # i may be traced: indexed in place, no copy of the stack
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack)

    def loop(count, body, carry):
        """`body` applied `count` times, as one `fori_loop`."""
        if count > 1:
            return jax.lax.fori_loop(0, count, lambda _, carry: body(carry), carry)
        for _ in range(count):
            carry = body(carry)
        return carry

    def plain_layer(carry):
        """(x, (k, v) caches, this layer's index) through one plain layer."""
        x, kv, i = carry
        p = layer_params(stacked, i)
        x, kv = attention(p, x, kv, i)
        return ffw(p, x), kv, i + 1

    def result(x, cache):
        if not all_logits:
            x = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)
        logits = model.logits(x)
        return (logits if all_logits else logits[:, 0]), cache | {"pos": t + length}

    carry = (x, (cache["k"], cache["v"]), jnp.zeros((), jnp.int32))
    if not c.cca_layers:
        x, (cache["k"], cache["v"]), _ = loop(c.num_layers, plain_layer, carry)
        return result(x, cache)

    cca = values(model.cca)

    def chunked_cross_attention(x, j, cca_cache):
        """CCA j (may be traced) of positions t..t+T-1: their attending chunks' neighbours."""
        cca_k, cca_v, cca_mask, cca_match, cca_tokens, fed_tokens = cca_cache
        p_cca = layer_params(cca, j)
        q = project(rms_norm(x, p_cca["norm"], c.norm_eps), p_cca["attn"]["q"])  # [B, T, H, D]
        sink = p_cca["attn"].get("sink")

        def bias(chunks, offsets, take):
            """The match logits [B, G, H, Q, Tk] of the keys of `chunks` [G], attended by the
            queries at `offsets` [Q] of H_u+; take(a) gathers their rows [B, G, ...] of a
            per-chunk cache entry a. None without a match option."""
            match = None if cca_match is None else take(cca_match)
            running = None
            if cca_tokens is not None:
                window = c.cca_running_match
                running = running_match(
                    fed_tokens, take(cca_tokens), chunks, offsets, window, m, c.pad_id
                )
            return match_logits(p_cca["attn"], match, running)

        if n == 1:  # one position: gather its attending chunk H_u+
            attending = jnp.maximum(t - (m - 1), 0) // m
            offset = (t - (m - 1)) % m
            q = rope(q, (m - 1 + offset)[None], c.rope_base)
            mask = cca_mask[:, attending][:, None, None, :]
            rows = bias(attending[None], offset[None], lambda a: a[:, attending][:, None])
            rows = None if rows is None else rows[:, 0]  # one chunk: [B, H, 1, Tk]
            y = attend(q, cca_k[j][:, attending], cca_v[j][:, attending], mask, sink, rows)
            # The first m-1 positions have no attending chunk: no CCA.
            return x + jnp.where(t >= m - 1, output(p_cca["attn"], y), 0.0)
        # A block: the queries laid out in whole attending chunks, as in the forward pass. Row q
        # of `groups` is position t - f + q; group g attends chunk (t+1)//m - 1 + g (none if
        # that is -1: the first m-1 positions), at rotary positions m-1 .. 2m-2.
        groups = -(-(n + m - 1) // m)
        f = (t + 1) % m
        heads = q.shape[2:]
        laid = jnp.zeros((batch, groups * m, *heads), q.dtype)
        laid = jax.lax.dynamic_update_slice_in_dim(laid, q, f, axis=1)
        laid = rope(laid.reshape(batch, groups, m, *heads), m - 1 + np.arange(m), c.rope_base)
        chunk = (t + 1) // m - 1 + jnp.arange(groups)
        exists = (chunk >= 0) & (chunk < cca_mask.shape[1])
        take = lambda a: jnp.take(a, chunk, axis=1, mode="clip")
        mask = (take(cca_mask) & exists[None, :, None])[:, :, None, None, :]
        rows = bias(chunk, jnp.arange(m), take)
        y = attend(laid, take(cca_k[j]), take(cca_v[j]), mask, sink, rows)  # [B, G, m, H, D]
        y = jax.lax.dynamic_slice_in_dim(y.reshape(batch, groups * m, *heads), f, n, axis=1)
        return x + output(p_cca["attn"], y)

    # Up to the first CCA layer; there the encoder is conditioned on the post-attention
    # activations, and the completed chunks' neighbours are encoded into the CCA caches.
    first = c.cca_layers[0]
    x, kv, i = loop(first - 1, plain_layer, carry)
    p = layer_params(stacked, i)
    x, kv = attention(p, x, kv, i)
    cache["chunk_h"] = jax.lax.dynamic_update_slice_in_dim(cache["chunk_h"], x, t, axis=1)
    if neighbours is not None:
        cache = _encode_chunks(model, cache, t // m, neighbours)
    cca_cache = tuple(
        cache.get(name)
        for name in ("cca_k", "cca_v", "cca_mask", "cca_match", "cca_tokens", "tokens")
    )
    carry = (ffw(p, chunked_cross_attention(x, 0, cca_cache)), kv, i + 1)

    def cca_block(plain: int):
        """`plain` plain layers, then a CCA layer's ATTN, CCA j and FFW: ((x, kv, i), j)."""

        def block(carry_j):
            carry, j = carry_j
            x, kv, i = loop(plain, plain_layer, carry)
            p = layer_params(stacked, i)
            x, kv = attention(p, x, kv, i)
            return (ffw(p, chunked_cross_attention(x, j, cca_cache)), kv, i + 1), j + 1

        return block

    later = c.cca_layers[1:]
    spacing = {j - i for i, j in zip(c.cca_layers, later)}
    if len(spacing) == 1:  # evenly spaced CCA layers: one loop over the blocks, as in training
        (gap,) = spacing
        carry, _ = loop(len(later), cca_block(gap - 1), (carry, jnp.ones((), jnp.int32)))
    else:
        for j, (prev, i) in enumerate(zip(c.cca_layers, later), start=1):
            carry, _ = cca_block(i - prev - 1)((carry, jnp.asarray(j, jnp.int32)))
    x, (cache["k"], cache["v"]), _ = loop(c.num_layers - c.cca_layers[-1], plain_layer, carry)
    return result(x, cache)


def cache_shardings(cache: dict, mesh: jax.sharding.Mesh) -> dict:
    """NamedSharding of each cache entry on `mesh` (heads over `tensor`, the rest replicated),
    spelt as jit spells its outputs' (no trailing None), so a step's output cache is an input
    of the same sharding and the next step reuses its compilation."""

    def sharding(name: str) -> NamedSharding:
        axes = list(logical_to_spec(_CACHE_AXES.get(name, ())))
        while axes and axes[-1] is None:
            axes.pop()
        return NamedSharding(mesh, PartitionSpec(*axes))

    return {name: sharding(name) for name in cache}


def _mesh_of(state) -> jax.sharding.Mesh | None:
    """The mesh a model's weights are split over, or None on one device."""
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def _jitted_feed(graphdef, mesh, all_logits, state, cache, tokens, neighbours, length):
    """`feed` on a split model. One jit for the whole process: the (hashable) graphdef is a
    static argument, so every Decoder of the same model structure (config) shares its compiled
    steps; the weights are traced, and a new Sampler on the same config does not retrace.

    On a mesh (weights split as in training) the caches keep their `cache_shardings` and the
    logits come back replicated, so every step compiles to the same layouts."""
    model = nnx.merge(graphdef, state)
    logits, cache = feed(model, cache, tokens, neighbours, length, all_logits=all_logits)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))
    return logits, cache


class Decoder:
    """A model split once into (graph, state) with a jitted `feed`; caches are donated.

    The jitted function is module-level (`_jitted_feed`), keyed by the graphdef: Decoders of
    models with the same config reuse each other's compilations. A model whose weights are split
    over a mesh (`load_model(..., mesh=...)`, `create_model(..., mesh=...)`) decodes on that
    mesh."""

    def __init__(self, model: Retro):
        self.model = model
        self._graphdef, self._state = nnx.split(model)
        self.mesh = _mesh_of(self._state)

    def init_cache(self, batch: int, max_len: int, num_neighbours: int) -> dict:
        cache = init_cache(self.model, batch, max_len, num_neighbours)
        if self.mesh is None:
            return cache
        return jax.device_put(cache, cache_shardings(cache, self.mesh))

    def step(
        self, cache: dict, token: jax.Array, neighbours: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """Feed token [B] at cache['pos'] -> (logits [B, V] for the next token, cache).

        `neighbours` [B, k, 2m]: the neighbours of the chunk this token completes; pass them
        exactly when (pos + 1) % m == 0 (retrieval uses the complete chunk, this token included).
        """
        token = jnp.reshape(token, (-1, 1))
        neighbours = None if neighbours is None else neighbours[:, None]
        return self._feed(cache, token, neighbours, None, False)

    def prefill(
        self,
        cache: dict,
        tokens: jax.Array,
        neighbours: jax.Array | None = None,
        *,
        length: int | None = None,
        all_logits: bool = False,
    ) -> tuple[jax.Array, dict]:
        """`feed` tokens [B, T] (the first `length` of them) in one call: see `feed`."""
        pos, max_len = int(cache["pos"]), cache["k"].shape[2]
        if pos + tokens.shape[1] > max_len:
            raise RetroError(
                f"prefill: {tokens.shape[1]} tokens at position {pos} overrun the cache's "
                f"{max_len} positions"
            )
        length = None if length is None else jnp.int32(length)
        return self._feed(cache, tokens, neighbours, length, all_logits)

    def _feed(self, cache, tokens, neighbours, length, all_logits):
        return _jitted_feed(
            self._graphdef, self.mesh, all_logits, self._state, cache, tokens, neighbours, length
        )
