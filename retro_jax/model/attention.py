"""Multi-head attention as pure functions: self-attention (causal or not) and cross-attention.

Parameters of one attention layer are a dict {q: [d, H, D], k: [d_kv, H, D], v: [d_kv, H, D],
o: [H, D, d]}, and for a cross-attention that may attend to nothing, sink: [H], or that weighs its
keys by how well their neighbour fits, match_bias and running_bias: [H] (`match_logits`).
Softmax runs in float32; a query whose keys are all masked gets exactly zero output (never NaN),
which the chunked cross-attention relies on for fully padded neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retro_jax.model.layers import dense, rope

_MASKED = -1e30
# match_bias is learned in these units, so that AdamW's steps (about the learning rate each) move
# a logit bias by a few nats within the few hundred steps of a small run.
MATCH_SCALE = 16.0


def match_logits(
    p: dict, match: jax.Array | None = None, running: jax.Array | None = None
) -> jax.Array | None:
    """The logit bias of CCA's neighbour matches: each head adds MATCH_SCALE * w[h] * share to
    the logits of every key, with w = p["match_bias"] [H] for match [..., Tk] (one share per key,
    `cca.neighbour_match`) and w = p["running_bias"] [H] for running [..., Tq, Tk] (one per query
    and key, `cca.running_match`). Returns their sum, broadcastable to the logits [..., H, Tq,
    Tk], or None without either."""

    def scaled(w, share):  # share [..., Q, Tk] -> [..., H, Q, Tk]
        w = MATCH_SCALE * w.astype(jnp.float32)
        return w[:, None, None] * share.astype(jnp.float32)[..., None, :, :]

    terms = []
    if match is not None:
        terms.append(scaled(p["match_bias"], match[..., None, :]))
    if running is not None:
        terms.append(scaled(p["running_bias"], running))
    return sum(terms[1:], terms[0]) if terms else None


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    sink: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """q [..., Tq, H, D], k/v [..., Tk, H, D], mask bool broadcastable to [..., H, Tq, Tk].

    Returns [..., Tq, H, D]. One softmax over all Tk keys; rows with no valid key give zeros.
    `sink` [H]: each head's logit of one more key whose value is zero, so that a query can
    attend to nothing (`RetroConfig.cca_sink`). `bias`, broadcastable to the logits
    [..., H, Tq, Tk], is added to them (`match_logits`).
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...qhd,...khd->...hqk", q * scale, k).astype(jnp.float32)
    # The mask enters as an additive -1e30 at its own (broadcast) shape: a masked logit rounds
    # to exactly -1e30 as with a select, but the backward pass needs no mask at the logits'
    # full shape (XLA:CPU wrote one out per attention; benchmarks/results/retrieval_pays.md,
    # a16).
    additive = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)
    if bias is not None:
        additive = additive + bias
    logits = logits + additive
    # The softmax's normalisation is deferred to the output: exp(logits - max) times v, then
    # divided by the row sums at [..., Tq, H, D] (D times fewer divisions than at the logits'
    # [..., H, Tq, Tk]), and the guard for rows with no valid key is applied there too. The same
    # values up to rounding, a pass less over the logits each way (benchmarks/results/model.md).
    top = jnp.max(logits, axis=-1, keepdims=True)
    if sink is not None:  # a key of logit `sink` and value zero: it only adds to the row sums
        sink_logit = sink.astype(jnp.float32)[:, None, None]
        top = jnp.maximum(top, sink_logit)
    top = jax.lax.stop_gradient(top)
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [..., H, Tq, 1], at least 1
    if sink is not None:
        total = total + jnp.exp(sink_logit - top)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v)
    out = out / jnp.swapaxes(total, -2, -3).astype(out.dtype)
    valid = mask.any(axis=-1, keepdims=True)  # [..., H or 1, Tq or 1, 1]
    valid = valid.reshape((1,) * (3 - valid.ndim) + valid.shape)  # (a mask [Tq, Tk] too)
    return jnp.where(jnp.swapaxes(valid, -2, -3), out, 0.0)  # [..., Tq, H, 1] against out


def project(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., T, d] x [d, H, D] -> [..., T, H, D]."""
    return dense(x, w)


def project_qkv(p: dict, x: jax.Array, ctx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return project(x, p["q"]), project(ctx, p["k"]), project(ctx, p["v"])


def output(p: dict, y: jax.Array) -> jax.Array:
    return dense(y, p["o"], contract=2)


def self_attention(
    p: dict,
    x: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array,
    *,
    causal: bool,
    rope_base: float,
) -> jax.Array:
    """x [..., T, d], positions [..., T], key_mask bool [..., T] (False = padding key)."""
    q, k, v = project_qkv(p, x, x)
    q, k = rope(q, positions, rope_base), rope(k, positions, rope_base)
    mask = key_mask[..., None, None, :]  # [..., 1, 1, Tk]
    if causal:
        t = x.shape[-2]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    return output(p, attend(q, k, v, mask))


def cross_attention(
    p: dict,
    x: jax.Array,
    ctx: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    key_mask: jax.Array,
    *,
    rope_base: float,
    bias: jax.Array | None = None,
) -> jax.Array:
    """x [..., Tq, d] attends to ctx [..., Tk, d_ctx]; key_mask bool [..., Tk]; bias, added to
    the logits [..., H, Tq, Tk] (`match_logits`), or None."""
    q, k, v = project_qkv(p, x, ctx)
    q, k = rope(q, q_positions, rope_base), rope(k, k_positions, rope_base)
    return output(p, attend(q, k, v, key_mask[..., None, None, :], p.get("sink"), bias))
