"""Sharded RETRO equals the single-device model on 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx

from retro_jax.errors import RetroError
from retro_jax.model import RetroConfig
from retro_jax.model.create import create_model
from retro_jax.sharding import MESH_AXES, batch_sharding, logical_to_spec, make_mesh

CONFIG = RetroConfig(
    vocab_size=64,
    chunk_size=4,
    num_layers=3,
    d_model=32,
    num_heads=4,
    head_dim=8,
    d_ff=64,
    cca_layers=(2, 3),
    enc_d_model=16,
    enc_num_heads=2,
    enc_head_dim=8,
    enc_d_ff=32,
)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (8, 16)).astype(np.int32)
    neighbours = rng.integers(0, 64, (8, 4, 2, 8)).astype(np.int32)
    return tokens, neighbours


@pytest.fixture(scope="module")
def reference(inputs):
    return np.asarray(create_model(CONFIG)(*inputs))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_logits_equal_single_device(shape, inputs, reference):
    mesh = make_mesh(dict(zip(MESH_AXES, shape)))
    model = create_model(CONFIG, mesh=mesh)
    # Every parameter is laid out as its logical names and the rules say.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        expected = jax.sharding.NamedSharding(mesh, logical_to_spec(names))
        assert var[...].sharding.is_equivalent_to(expected, var[...].ndim), path
    with jax.set_mesh(mesh):
        tokens, neighbours = (jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in inputs)
        logits = nnx.jit(lambda m, t, n: m(t, n))(model, tokens, neighbours)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5)


def test_mesh_shape_errors_name_the_problem():
    with pytest.raises(RetroError, match="at most one axis"):
        make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(RetroError, match="needs 6 devices"):
        make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
    assert make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape["data"] == 2
