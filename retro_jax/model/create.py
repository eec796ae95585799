"""Building a model: sharded at birth on a mesh, or abstract (shapes only, nothing allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.config import RetroConfig
from retro_jax.model.retro import Retro
from retro_jax.sharding import state_shardings


def abstract_model(config: RetroConfig) -> Retro:
    """The model with ShapeDtypeStruct leaves: for parameter counts and memory plans."""
    return nnx.eval_shape(lambda: Retro(config, rngs=nnx.Rngs(0)))


def lower_loss_grad(
    config: RetroConfig, *, batch: int, seq_len: int, neighbours: int
) -> jax.stages.Lowered:
    """The gradient of the training loss (`Retro.token_nll`) of one device's batch with respect
    to every parameter, lowered from abstract shapes (nothing is allocated): what the compile
    time and memory benchmarks compile. `neighbours=0` or a baseline config: no retrieval."""
    graphdef, state = nnx.split(abstract_model(config))
    m = config.chunk_size
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    retrieved = None
    if neighbours and config.cca_layers:
        retrieved = jax.ShapeDtypeStruct((batch, seq_len // m, neighbours, 2 * m), jnp.int32)

    def loss(state, tokens, retrieved):  # (the targets' values do not change the program)
        return nnx.merge(graphdef, state).token_nll(tokens, retrieved, tokens).mean()

    return jax.jit(jax.grad(loss)).lower(state, tokens, retrieved)


def create_model(
    config: RetroConfig, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0
) -> Retro:
    """A freshly initialised model; with a mesh, every parameter is created already sharded.

    The init is jitted with the parameters' shardings as `out_shardings`, so no device ever holds
    a full copy of a parameter that the rules shard.
    """
    if mesh is None:
        return Retro(config, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        state = nnx.state(Retro(config, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)
