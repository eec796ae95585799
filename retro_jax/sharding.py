"""Device meshes and the one table of rules from logical axis names to mesh axes.

Every parameter carries logical axis names (`nnx.with_partitioning`, metadata `out_sharding`);
key activations are constrained with `constrain`. Mesh axes: `data` (pure data parallelism),
`fsdp` (data parallelism with parameters and optimizer state sharded: ZeRO-3), `tensor`
(Megatron-style: heads and FFW hidden units split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.errors import RetroError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters shard `embed` over fsdp;
# activations keep their embed dimension whole (`act_embed`) and split heads / mlp over tensor.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("lookup_batch", "data"),  # embedding lookups: batch over data only, see embed_lookup
    ("length", None),
    ("chunks", None),
    ("neighbours", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("table", None),  # embedding tables: gathered rows, so only the embed axis is split
    ("norm", None),
    ("layers", None),
)
_RULES = dict(RULES)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of an array whose axes have these logical names."""
    axes = []
    for name in names:
        if name is not None and name not in _RULES:
            raise RetroError(f"sharding: no rule for logical axis {name!r}")
        axes.append(None if name is None else _RULES[name])
    return PartitionSpec(*axes)


def make_mesh(shape, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; `shape` is a mapping or ConfigDict, one entry may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise RetroError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise RetroError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise RetroError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"there are {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )


def batch_ways(mesh: jax.sharding.Mesh) -> int:
    """How many ways a batch splits: the devices along the batch axes (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divides(batch: int, mesh: jax.sharding.Mesh, setting: str) -> None:
    """One-line RetroError naming `setting` unless `batch` is a positive multiple of the mesh's
    batch devices (a global batch whose rows do not split evenly over data x fsdp)."""
    ways = batch_ways(mesh)
    if batch < 1 or batch % ways:
        raise RetroError(
            f"{setting}={batch} must be a positive multiple of the {ways} batch devices of the "
            f"mesh (mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']})"
        )


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names (a no-op without a mesh in context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def variable_spec(variable: nnx.Variable) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    return logical_to_spec(names) if names else PartitionSpec()


def state_shardings(state, mesh: jax.sharding.Mesh):
    """NamedSharding of every variable of an nnx.State, from its logical names and RULES; a
    one-line RetroError for a parameter dimension that its mesh axes do not divide."""

    def sharding(path, variable):
        spec = variable_spec(variable)
        shape = tuple(getattr(variable, "value", variable).shape)
        names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        for size, axes, name in zip(shape, spec, names):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                split = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
                where = jax.tree_util.keystr(path, simple=True, separator=".")
                raise RetroError(
                    f"mesh: {split} does not divide the {size} {name!r} of parameter {where} "
                    f"{list(shape)}; choose mesh sizes that divide the model's dimensions "
                    "(heads, d_ff, d_model, vocabulary)"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """Place a host-local numpy batch on the mesh as global arrays (multi-host aware)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(x)), np.asarray(x)
        ),
        batch,
    )
