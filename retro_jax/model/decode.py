"""Incremental decoding: one position per step with key/value caches and cached neighbours.

Each step costs one position: self-attention reads the cached keys/values of earlier positions;
the neighbours of chunk C_u are encoded once, when its last token is fed (the paper's order:
E_u conditions positions u*m + m-1 onwards), and their CCA keys/values are cached per chunk.
The same pure functions as the full forward pass are used, so both give the same logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.model.attention import attend, output, project, project_qkv
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
    which condition the encoder); cca_k/cca_v [cca_layers, B, chunks, k*2m, H, D].
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
    return cache


def _encode_chunk(model: Retro, cache: dict, neighbours: jax.Array) -> dict:
    """Encode the neighbours [B, k, 2m] of the chunk ending at cache['pos'] into the CCA caches."""
    c = model.config
    m, t = c.chunk_size, cache["pos"]
    u = t // m
    batch, k, r = neighbours.shape
    chunk_h = jax.lax.dynamic_slice_in_dim(cache["chunk_h"], u * m, m, axis=1)[:, None]
    chunk_mask = jax.lax.dynamic_slice_in_dim(cache["token_mask"], u * m, m, axis=1)[:, None]
    encoded = model.encoder(neighbours[:, None], chunk_h, chunk_mask)[:, 0]  # [B, k, r, de]
    encoded = encoded.reshape(batch, k * r, -1)
    k_pos = jnp.tile(jnp.arange(r), k)
    cca = values(model.cca)
    keys, vals = [], []
    for j in range(len(c.cca_layers)):
        p = jax.tree.map(lambda a, j=j: a[j], cca["attn"])
        keys.append(rope(project(encoded, p["k"]), k_pos, c.rope_base))
        vals.append(project(encoded, p["v"]))
    put = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new, u, axis=2)
    mask = (neighbours != c.pad_id).reshape(batch, k * r)
    return cache | {
        "cca_k": put(cache["cca_k"], jnp.stack(keys)),
        "cca_v": put(cache["cca_v"], jnp.stack(vals)),
        "cca_mask": jax.lax.dynamic_update_index_in_dim(cache["cca_mask"], mask, u, axis=1),
    }


def decode_step(
    model: Retro, cache: dict, token: jax.Array, neighbours: jax.Array | None = None
) -> tuple[jax.Array, dict]:
    """Feed `token` [B] at position cache['pos']; returns (logits [B, V] for the next token, cache).

    `neighbours` [B, k, 2m]: the neighbours of the chunk this token completes; pass them exactly
    when (pos + 1) % m == 0 (retrieval uses the complete chunk, this token included).

    The layers run in the forward pass's blocks: plain layers, then each CCA layer with the plain
    layers before it. Each run of plain layers is one `fori_loop`, and so are evenly spaced CCA
    blocks (whatever `scan_layers` says: decoding has no backward pass to unroll for), with the
    whole key/value cache in the carry (each layer writes its row at position t in place) and
    each layer's weights indexed in place from the stacks. A deep model compiles one layer, not
    all of them, and no step copies its weights: a static slice of a stacked weight is a copy on
    XLA:CPU, which made unrolled steps about 3x slower (benchmarks/results/eval_sample.md).
    """
    c = model.config
    m, t = c.chunk_size, cache["pos"]
    max_len = cache["k"].shape[2]
    x = model.embed_tokens(token[:, None])  # [B, 1, d]
    token_mask = cache["token_mask"].at[:, t].set(token != c.pad_id)
    cache = cache | {"token_mask": token_mask}
    visible = (token_mask & (jnp.arange(max_len) <= t))[:, None, None, :]  # [B, 1, 1, T]
    stacked = values(model.decoder)
    attending = jnp.maximum(t - (m - 1), 0) // m  # which attending chunk H_u+ position t is in

    def attention(p, x, kv, i):
        """Layer i's ATTN (i may be traced): writes its key/value rows at t, reads 0..t."""
        h = rms_norm(x, p["attn_norm"], c.norm_eps)
        q, k, v = project_qkv(p["attn"], h, h)
        q, k = rope(q, t[None], c.rope_base), rope(k, t[None], c.rope_base)
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

    carry = (x, (cache["k"], cache["v"]), jnp.zeros((), jnp.int32))
    if not c.cca_layers:
        x, (cache["k"], cache["v"]), _ = loop(c.num_layers, plain_layer, carry)
        return model.logits(x)[:, 0], cache | {"pos": t + 1}

    cca = values(model.cca)

    def chunked_cross_attention(x, j, cca_cache):
        """CCA j (may be traced) of position t: its attending chunk's cached neighbours."""
        cca_k, cca_v, cca_mask = cca_cache
        p_cca = layer_params(cca, j)
        h = rms_norm(x, p_cca["norm"], c.norm_eps)
        q = rope(project(h, p_cca["attn"]["q"]), (m - 1 + (t - (m - 1)) % m)[None], c.rope_base)
        mask = cca_mask[:, attending][:, None, None, :]
        y = attend(q, cca_k[j][:, attending], cca_v[j][:, attending], mask)
        # The first m-1 positions have no attending chunk: no CCA.
        return x + jnp.where(t >= m - 1, output(p_cca["attn"], y), 0.0)

    # Up to the first CCA layer; there the encoder is conditioned on the post-attention
    # activations, and a completed chunk's neighbours are encoded into the CCA caches.
    first = c.cca_layers[0]
    x, kv, i = loop(first - 1, plain_layer, carry)
    p = layer_params(stacked, i)
    x, kv = attention(p, x, kv, i)
    cache["chunk_h"] = cache["chunk_h"].at[:, t].set(x[:, 0])
    if neighbours is not None:
        cache = _encode_chunk(model, cache, neighbours)
    cca_cache = (cache["cca_k"], cache["cca_v"], cache["cca_mask"])
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
    return model.logits(x)[:, 0], cache | {"pos": t + 1}


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


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _jitted_step(graphdef, mesh, state, cache, token, neighbours):
    """decode_step on a split model. One jit for the whole process: the (hashable) graphdef is a
    static argument, so every Decoder of the same model structure (config) shares its compiled
    steps; the weights are traced, and a new Sampler on the same config does not retrace.

    On a mesh (weights split as in training) the caches keep their `cache_shardings` and the
    logits come back replicated, so every step compiles to the same layouts."""
    logits, cache = decode_step(nnx.merge(graphdef, state), cache, token, neighbours)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))
    return logits, cache


class Decoder:
    """A model split once into (graph, state) with a jitted `decode_step`; caches are donated.

    The jitted step is module-level (`_jitted_step`), keyed by the graphdef: Decoders of models
    with the same config reuse each other's compilations. A model whose weights are split over a
    mesh (`load_model(..., mesh=...)`, `create_model(..., mesh=...)`) decodes on that mesh."""

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
        return _jitted_step(self._graphdef, self.mesh, self._state, cache, token, neighbours)
