"""Parameters with logical axis names, and the pure functions of a transformer layer.

Modules hold parameters (see retro.py); the math lives here as pure functions of arrays so that
stacked layers can be scanned, rematerialised and decoded step by step with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    names: Sequence[str | None],
    *,
    fan_in: int | None = None,
    value: float | None = None,
) -> nnx.Param:
    """A float32 parameter tagged with logical axis names (mapped to mesh axes by sharding.RULES).

    Weights are truncated-normal with std 1/sqrt(fan_in); `value` gives a constant (norm scales).
    Sharding is applied by the caller (`create_model` jits the init with out_shardings), so eager
    sharding is off and a model can also be built without any mesh.
    """
    assert len(shape) == len(names), (shape, names)
    if value is not None:
        init = jnp.full(tuple(shape), value, jnp.float32)
    else:
        std = (fan_in or shape[0]) ** -0.5
        init = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, tuple(shape))
    return nnx.Param(init, out_sharding=tuple(names), eager_sharding=False)


def embed_lookup(table: jax.Array, ids: jax.Array, dtype, names: Sequence[str | None]) -> jax.Array:
    """Rows of an embedding table [V, d] for int ids [batch, ...] -> [batch, ..., d] in `dtype`,
    laid out as the logical `names` (batch first, `act_embed` last).

    The table's d axis is split over fsdp. Each device first gathers its d-slice of the rows for
    the ids of its whole data-parallel group ([batch over data only, ..., d over fsdp]: local
    work), then one all-to-all over fsdp gives the activation layout. Asked directly for that
    layout, XLA's partitioner replicates the lookup of the whole global batch and slices it (an
    "involuntary full rematerialization"), in the forward and the backward pass.
    """
    x = jnp.take(table, ids, axis=0).astype(dtype)
    x = constrain(x, ("lookup_batch", *names[1:-1], "embed"))
    return constrain(x, names)


def layer_params(stack: dict, i: int) -> dict:
    """Layer i's params of a stack (params with a leading layers axis)."""
    return jax.tree.map(lambda a: a[i], stack)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *K] times a weight w [*K, *N] (K its first `contract` axes) -> [..., *N] in x's
    dtype, computed as one [rows, K] x [K, N] matrix product.

    The reshapes are free (the axes are contiguous), and they decide the backward pass on a CPU:
    the weight gradient of a flat product is one matmul of the operands as they lie, where the
    same product written as an einsum over [batch, length, ...] makes XLA:CPU copy a transposed
    activation first and fall back to a slower matmul kernel (benchmarks/results/model.md).
    """
    k_shape, n_shape = w.shape[:contract], w.shape[contract:]
    rows = x.shape[: x.ndim - contract]
    k, n = math.prod(k_shape), math.prod(n_shape)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, n).astype(x.dtype))
    return y.reshape(*rows, *n_shape)


@jax.custom_vjp
def _wide_product(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w)


def _wide_forward(x, w):
    return jnp.dot(x, w), (x, w)


def written_transpose(x: jax.Array) -> jax.Array:
    """x^T [K, rows] of x [rows, K] written out, behind a barrier that keeps XLA from folding the
    transpose back into the product that reads it."""
    return jax.lax.optimization_barrier(x.T + jnp.zeros((), x.dtype))


def _wide_backward(saved, g):
    x, w = saved
    # x^T written out first: the weight gradient is then a plain [K, rows] x [rows, N] product.
    # XLA:CPU otherwise contracts x and g over their leading axis in a generic kernel, at half
    # the rate when N >> K (benchmarks/results/retrieval_pays.md, a12).
    return jnp.dot(g, w.T), jnp.dot(written_transpose(x), g)


_wide_product.defvjp(_wide_forward, _wide_backward)


def dense_wide(x: jax.Array, w: jax.Array) -> jax.Array:
    """`dense` for a product far wider than deep (w [K, N] with N >> K: the vocabulary head),
    with its weight gradient computed from a written-out x^T. On XLA:CPU that product ran at
    37 GFLOP/s for the demo's head (K 128, N 4,096, 2,048 rows) and at 72 with x^T written
    first; the copy is rows x K floats, a K/N share of the product's operands."""
    rows = x.shape[:-1]
    y = _wide_product(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))
    return y.reshape(*rows, w.shape[1])


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}


def feed_forward(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str) -> jax.Array:
    """The GPT-2-like FFW: two matrices and a nonlinearity. x [..., d] -> [..., d]."""
    return dense(ACTIVATIONS[activation](dense(x, w_in)), w_out)


def rope(x: jax.Array, positions: jax.Array | np.ndarray, base: float) -> jax.Array:
    """Rotary position embedding. x [..., T, H, D], positions broadcastable to [..., T].

    Positions known when tracing (a NumPy array: every forward pass's `np.arange`) get their
    sine and cosine tables computed here, in float64, and enter the program as constants; XLA:CPU
    ran the rotation and its gradient 5-10x slower with tables computed inside the program
    (benchmarks/results/model.md). Traced positions (a decoding step's) compute them in float32.
    """
    half = x.shape[-1] // 2
    xp, dtype = (np, np.float64) if isinstance(positions, np.ndarray) else (jnp, jnp.float32)
    freq = base ** (-xp.arange(half, dtype=dtype) / half)  # [D/2]
    angle = positions.astype(dtype)[..., None] * freq  # [..., T, D/2]
    # [..., T, 1, D/2] each
    sin, cos = (jnp.asarray(f(angle), jnp.float32)[..., None, :] for f in (xp.sin, xp.cos))
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
