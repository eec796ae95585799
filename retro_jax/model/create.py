"""Building a model: sharded at birth on a mesh, or abstract (shapes only, nothing allocated)."""

from __future__ import annotations

import jax
from flax import nnx

from retro_jax.model.config import RetroConfig
from retro_jax.model.retro import Retro
from retro_jax.sharding import state_shardings


def abstract_model(config: RetroConfig) -> Retro:
    """The model with ShapeDtypeStruct leaves: for parameter counts and memory plans."""
    return nnx.eval_shape(lambda: Retro(config, rngs=nnx.Rngs(0)))


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


def count_params(tree) -> int:
    """Number of parameters of a model (abstract or real) or of a state."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return sum(int(x.size) for x in jax.tree.leaves(state))
