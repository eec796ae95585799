"""Sharded RETRO equals the single-device model on 8 fake CPU devices."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE_ENV
from flax import nnx
from model_configs import forward

from retro_jax.errors import RetroError
from retro_jax.model import RetroConfig
from retro_jax.model.create import create_model
from retro_jax.sharding import MESH_AXES, batch_sharding, logical_to_spec, make_mesh

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

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
    cca_zero_init=False,  # drawn CCA outputs, so neighbours reach the logits at init
)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (8, 16)).astype(np.int32)
    neighbours = rng.integers(0, 64, (8, 4, 2, 8)).astype(np.int32)
    return tokens, neighbours


@pytest.fixture(scope="module")
def reference(inputs):
    return np.asarray(forward(create_model(CONFIG), *inputs))


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


# One sharded train step (forward, backward, AdamW) of the tiny preset per mesh shape. CONFIG's
# smaller shapes do not show the problem; XLA's warnings need TF_CPP_MIN_LOG_LEVEL below 2, so
# this runs in a fresh process.
TRAIN_STEP_SCRIPT = """
import sys
from types import SimpleNamespace
import jax, numpy as np
from retro_jax.model import RetroConfig
from retro_jax.model.create import create_model
from retro_jax.sharding import MESH_AXES, make_mesh, shard_batch
from retro_jax.train.state import init_state
from retro_jax.train.step import batch_shardings, make_optimizer, make_train_step

train = SimpleNamespace(learning_rate=1e-3, warmup_steps=1, steps=10, min_lr_ratio=0.1,
                        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
config = RetroConfig.preset("tiny")
rng = np.random.default_rng(0)
tokens = rng.integers(1, config.vocab_size, (8, 64)).astype(np.int32)
batch = {"tokens": tokens, "targets": tokens, "loss_mask": np.ones((8, 64), np.float32),
         "neighbours": rng.integers(0, config.vocab_size, (8, 4, 2, 32)).astype(np.int32)}
for shape in ((2, 2, 2), (1, 8, 1)):
    mesh = make_mesh(dict(zip(MESH_AXES, shape)))
    tx, schedule = make_optimizer(train)
    model_def, state, shardings = init_state(create_model(config, mesh=mesh), tx, mesh=mesh)
    with jax.set_mesh(mesh):
        placed = shard_batch(batch, mesh)
        step = make_train_step(model_def, tx, schedule, retrieval=True, state_shardings=shardings,
                               batch_shardings=batch_shardings(placed, mesh))
        jax.block_until_ready(step(state, placed))
    print("stepped", shape, file=sys.stderr, flush=True)
"""


def test_sharded_train_step_replicates_no_activation():
    """XLA warns when a resharding forces it to replicate a whole array first ("involuntary full
    rematerialization"): the embedding lookups did, for the whole global batch. No such warning
    may come from the sharded train step."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", JAX_PLATFORMS="cpu", **FAST_COMPILE_ENV)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    run = subprocess.run(
        [sys.executable, "-c", TRAIN_STEP_SCRIPT], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("stepped") == 2
    assert "Involuntary full rematerialization" not in run.stderr, run.stderr[-3000:]


def test_mesh_shape_errors_name_the_problem():
    with pytest.raises(RetroError, match="at most one axis"):
        make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(RetroError, match="needs 6 devices"):
        make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
    assert make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape["data"] == 2
    # A mesh axis that does not divide a parameter dimension: one line naming both.
    heads_of_2 = RetroConfig.preset("tiny").replace(num_heads=2, head_dim=32, enc_num_heads=2)
    with pytest.raises(RetroError, match=r"mesh.tensor=8 does not divide the 2 'heads'"):
        create_model(heads_of_2, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 8}))
