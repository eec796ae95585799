"""layers.dense and dense_wide: the einsum they replace, in value and gradient, computed as flat
2-D products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model.layers import dense, dense_wide

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

CASES = [  # x shape, w shape, contract, the einsum it stands for
    ((2, 5, 6), (6, 3, 4), 1, "btd,dhk->bthk"),
    ((2, 5, 3, 4), (3, 4, 6), 2, "bthk,hkd->btd"),
    ((7, 6), (6, 9), 1, "td,dv->tv"),
]


@pytest.mark.parametrize("x_shape, w_shape, contract, spec", CASES)
def test_dense_equals_its_einsum_with_gradients(x_shape, w_shape, contract, spec):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    with jax.default_matmul_precision("highest"):
        ours = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, contract))), (0, 1))
        ref = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w))), (0, 1))
        (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-5)


def test_dense_backward_is_flat_matmuls():
    """Every product in the gradient is rank 2 x rank 2: the form XLA:CPU runs without copies."""
    x, w = jnp.ones((2, 5, 6)), jnp.ones((6, 3, 4))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense(x, w)), (0, 1)))(x, w)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, d/dx, d/dw
    assert all(v.aval.ndim == 2 for e in dots for v in e.invars)


@pytest.mark.parametrize("x_shape", [(7, 6), (2, 5, 6)])
def test_dense_wide_equals_dense_with_gradients_and_under_jit(x_shape):
    kx, kw = jax.random.split(jax.random.key(1))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, (6, 40))
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(dense_wide(x, w))), (0, 1)))
        ref = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w))), (0, 1))
        (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-5)


def test_dense_wide_backward_is_plain_matmuls_on_a_written_out_transpose():
    """Every product contracts its left operand's last axis with its right one's first (a plain
    [M, K] x [K, N] matmul); the weight gradient's left operand is x^T behind a barrier, which
    keeps XLA from folding the transpose back into the product."""
    x, w = jnp.ones((2, 5, 6)), jnp.ones((6, 40))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense_wide(x, w)), (0, 1)))(x, w)
    eqns = jaxpr.jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, d/dx, d/dw
    assert all(e.params["dimension_numbers"][0] == ((1,), (0,)) for e in dots)
    barrier = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    assert len(barrier) == 1 and barrier[0].outvars[0] is dots[-1].invars[0]
