"""The train state: trainable and frozen parameters, optimizer state, step and RNG, as one pytree.

Parameters are kept as plain nested dicts of arrays (nnx.State.to_pure_dict) so that the state
is an ordinary pytree for jit, optax and Orbax; the model is rebuilt inside the step with
`nnx.merge(graphdef, params, frozen)`. `frozen` is empty except when retro-fitting, where it holds
the baseline's decoder weights: they never enter the optimizer, so they stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.model.retro import Retro
from retro_jax.sharding import state_shardings

# Retro-fitting trains only the neighbour encoder and the chunked cross-attention (paper 4.2).
RETROFIT_TRAINABLE = nnx.Any(nnx.PathContains("encoder"), nnx.PathContains("cca"))
ALL_PARAMS = nnx.Param


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step int32 []; params / frozen: nested dicts of float32 arrays; rng: uint32 key data [2]."""

    step: jax.Array
    params: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: merge it with parameter dicts to get a Retro."""

    graphdef: Any

    def merge(self, params: dict, frozen: dict) -> Retro:
        return nnx.merge(self.graphdef, nnx.State(params), nnx.State(frozen))


def split_model(model: Retro, trainable=ALL_PARAMS) -> tuple[ModelDef, dict, dict]:
    """(ModelDef, trainable params dict, frozen params dict) of a model."""
    graphdef, trained, frozen = nnx.split(model, trainable, nnx.Param)
    return ModelDef(graphdef), trained.to_pure_dict(), frozen.to_pure_dict()


def param_shardings(model: Retro, trainable, mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
    """NamedShardings (trainable, frozen) as dicts, from the parameters' logical axis names."""
    _, trained, frozen = nnx.split(model, trainable, nnx.Param)
    return (
        state_shardings(trained, mesh).to_pure_dict(),
        state_shardings(frozen, mesh).to_pure_dict(),
    )


def merge_dicts(a: dict, b: dict) -> dict:
    """Deep union of two nested dicts with disjoint leaves (trainable + frozen = all params)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_dicts(out[key], value)
        elif key in out:
            raise ValueError(f"parameter {key!r} is both trainable and frozen")
        else:
            out[key] = value
    return out


def pick(tree: dict, like: dict) -> dict:
    """The subtree of `tree` with the keys of `like` (split a full dict as another is split)."""
    return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def init_state(
    model: Retro,
    tx: optax.GradientTransformation,
    trainable=ALL_PARAMS,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ModelDef, TrainState, Any]:
    """(ModelDef, TrainState, shardings of the state or None) of a freshly created model.

    With a mesh, optimizer moments are sharded like their parameters (ZeRO over fsdp) and
    scalars (step, counts, rng) are replicated.
    """
    model_def, params, frozen = split_model(model, trainable)
    if mesh is None:
        opt_state = tx.init(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, frozen, opt_state, _key(seed))
        return model_def, state, None
    p_sh, f_sh = param_shardings(model, trainable, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        p_sh,
        transform_non_params=lambda _: replicated,
    )
    shardings = TrainState(replicated, p_sh, f_sh, opt_sh, replicated)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        rng = jax.device_put(_key(seed), replicated)
    return model_def, TrainState(step, params, frozen, opt_state, rng), shardings


def _key(seed: int) -> jax.Array:
    # Raw uint32 key data: an ordinary array for Orbax (typed keys need special handling).
    return jax.random.key_data(jax.random.key(seed))


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of a state: the target of a checkpoint restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )
