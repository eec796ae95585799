"""Per-device memory of a training run, planned without allocating anything.

`memory_plan(config, mesh, topology="v5p-128", batch_size=..., ...)` builds the model and its
AdamW state with `jax.eval_shape`, shards every array by its logical axis names
(`retro_jax.sharding.RULES`) on a `jax.sharding.AbstractMesh` of the topology's device count,
and adds an analytic estimate of the activations that the backward pass keeps for the batch,
sequence length, number of neighbours and the model's remat policy. It takes a RetroConfig and
the training shape, not an experiment config: `retro_jax.model_info.memory_plan_of` reads those
from one for `retro-jax model-info`, the experiment configs and their tests.

Topology names: `v4-N` and `v5p-N` count TensorCores (2 per chip, one JAX device per chip), so
`v4-256` is 128 devices; `v5e-N` (alias `v5litepod-N`) and `v6e-N` count chips; `h100-N`,
`h200-N` count GPUs; `cpu-N` has no HBM limit (fits is None).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import optax
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from retro_jax.errors import RetroError
from retro_jax.model.config import RetroConfig
from retro_jax.model.create import abstract_model
from retro_jax.sharding import MESH_AXES, variable_spec

GIB = 1 << 30
# XLA keeps some HBM for its own buffers, and allocations fragment: plan with this fraction.
USABLE_FRACTION = 0.9
# XLA's compiled memory analysis of the 172M config's gradient reports 1.10-1.26x the activation
# count below (benchmarks/bench_memory_plan.py, benchmarks/results/memory.md): the plan adds this
# fraction of it as overhead (copies, layouts, fusion temporaries).
ACTIVATION_OVERHEAD = 0.3
# chip -> (HBM bytes per device, TensorCores named per device in the topology, devices per host)
CHIPS: dict[str, tuple[int | None, int, int]] = {
    "v4": (32 * GIB, 2, 4),
    "v5p": (95 * GIB, 2, 4),
    "v5e": (16 * GIB, 1, 4),
    "v6e": (32 * GIB, 1, 4),
    "h100": (80 * GIB, 1, 8),
    "h200": (141 * GIB, 1, 8),
    "cpu": (None, 1, 1),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: `v5p-128` is 64 v5p chips (64 JAX devices) of 95 GiB each."""

    name: str
    chip: str
    devices: int
    hbm_bytes: int | None
    devices_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, math.ceil(self.devices / self.devices_per_host))


def parse_topology(name: str) -> Topology:
    """`v5p-128`, `v4-256`, `v5e-256` (or `v5litepod-256`), `v6e-64`, `h100-8`, `cpu-8`."""
    match = re.fullmatch(r"([a-z0-9]+?)-(\d+)", name.strip().lower())
    chip = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if chip not in CHIPS:
        raise RetroError(
            f"unknown topology {name!r}; use CHIP-N with CHIP one of {', '.join(CHIPS)} "
            "(e.g. v5p-128, v4-256, v5e-256, h100-8)"
        )
    hbm, cores_per_device, per_host = CHIPS[chip]
    count = int(match.group(2))
    if count <= 0 or count % cores_per_device:
        raise RetroError(f"topology {name!r}: {chip} counts TensorCores, use a multiple of 2")
    devices = count // cores_per_device
    return Topology(name, chip, devices, hbm, min(per_host, devices))


def resolve_mesh(mesh: Mapping[str, int], devices: int) -> dict[str, int]:
    """Sizes of the (data, fsdp, tensor) axes for `devices`; one axis may be -1 (the rest)."""
    sizes = {axis: int(mesh[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(free) > 1 or known <= 0:
        raise RetroError(f"mesh: at most one axis may be -1 and the rest positive, got {sizes}")
    if free:
        if devices % known:
            raise RetroError(f"mesh: {devices} devices do not divide by {known} ({sizes})")
        sizes[free[0]] = devices // known
    if math.prod(sizes.values()) != devices:
        raise RetroError(f"mesh: {sizes} needs {math.prod(sizes.values())} devices, have {devices}")
    return sizes


def _trainable(path: tuple, retrofit: bool) -> bool:
    # Retro-fitting (paper 4.2) trains only the encoder and the CCA layers.
    return not retrofit or path[0].key in ("encoder", "cca")


def _sharded_bytes(tree, specs: dict, mesh: AbstractMesh, problems: list[str]) -> int:
    """Bytes per device of a tree whose leaves are matched to parameter specs by path suffix."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = next((specs[path[i:]] for i in range(len(path)) if path[i:] in specs), None)
        shape = tuple(leaf.shape)
        if spec is not None and shape:
            try:
                shape = NamedSharding(mesh, spec).shard_shape(shape)
            except ValueError:
                name = jax.tree_util.keystr(path)
                problems.append(f"{name} {tuple(leaf.shape)} does not divide over {spec}")
                shape = tuple(math.ceil(s / _ways(spec, i, mesh)) for i, s in enumerate(shape))
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _ways(spec, axis: int, mesh: AbstractMesh) -> int:
    entry = spec[axis] if axis < len(spec) else None
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return math.prod(mesh.shape[name] for name in names)


def activation_bytes(
    c: RetroConfig, *, batch: int, seq_len: int, neighbours: int, tensor: int
) -> dict[str, int]:
    """Activations kept for the backward pass of one microbatch on one device (an estimate).

    batch: sequences per device per microbatch; the residual stream [batch, n, d] is replicated
    over `tensor`, heads, FFW units and the vocabulary are split over it. Attention keeps its
    [batch, heads, n, n] probabilities for the backward pass, in float32 and in the compute
    dtype (no flash attention). Decoder layers without CCA run under `remat` when the config
    asks: then each keeps only its input, plus one layer's working set while it is recomputed.
    CCA layers and the encoder are counted as if never rematerialised (an upper bound); the
    loss's logits are, `logits_chunk` positions at a time, when the config sets it.
    """
    s = DTYPE_BYTES[c.dtype]
    b, n, d, m = batch, seq_len, c.d_model, c.chunk_size
    heads, ff, vocab = (math.ceil(x / tensor) for x in (c.num_heads, c.d_ff, c.vocab_size))
    hd = heads * c.head_dim
    retrieve = bool(c.cca_layers) and neighbours > 0 and n >= m
    cca_layers = len(c.cca_layers) if retrieve else 0
    plain_layers = c.num_layers - cca_layers

    # One decoder layer: x, norms, q/k/v (+ rotated q/k), attention out, projections, FFW.
    layer = b * n * (6 * d * s + 6 * hd * s + 2 * ff * s) + b * heads * n * n * (4 + s)
    if c.remat:
        decoder = plain_layers * b * n * d * s + (layer if plain_layers else 0)
    else:
        decoder = plain_layers * layer
    out = {"decoder": decoder, "embeddings": b * n * d * s}
    # Logits in the compute dtype and, in backward, their float32 gradient (the loss is
    # logsumexp minus the target's logit: no log-probability array), of `logits_chunk`
    # positions at a time (recomputed in the backward pass), or of all n.
    out["logits_and_loss"] = b * min(c.logits_chunk or n, n) * vocab * (s + 4)
    if not retrieve:
        return out

    chunks, r = n // m, 2 * m
    kr = neighbours * r
    # CCA: per chunk, m queries attend jointly to k*r neighbour tokens.
    cca = (
        b * n * (4 * d * s + 3 * hd * s)
        + b * chunks * kr * hd * s * 3
        + b * chunks * heads * m * kr * (4 + s)
    )
    out["cca_layers"] = cca_layers * (layer + cca)
    # Encoder over all neighbours of all chunks: tokens [b, chunks, k, r]; heads not split.
    tokens = b * chunks * kr
    de, ehd = c.enc_d_model, c.enc_num_heads * c.enc_head_dim
    enc_layer = tokens * (
        6 * de * s + 6 * ehd * s + 2 * c.enc_d_ff * s
    ) + b * chunks * neighbours * c.enc_num_heads * r * r * (4 + s)
    enc_cross = tokens * (3 * de * s + 3 * ehd * s) + tokens * c.enc_num_heads * m * (4 + s)
    out["encoder"] = (
        tokens * de * s * 2 + c.enc_num_layers * enc_layer + len(c.enc_cross_layers) * enc_cross
    )
    return out


def memory_plan(
    config: RetroConfig,
    mesh: Mapping[str, int],
    *,
    batch_size: int,
    seq_len: int,
    num_neighbours: int,
    grad_accum: int = 1,
    retrofit: bool = False,
    topology: str | None = None,
) -> dict:
    """Parameters and per-device memory of training `config` on a topology.

    mesh: the sizes of the data, fsdp and tensor axes (one may be -1: the remaining devices).
    batch_size: the global batch in sequences, split into `grad_accum` microbatches; retrofit:
    only the encoder and the CCA layers train. topology: a name such as "v5p-128" (see
    `parse_topology`); None: a CPU host with as many devices as the mesh's fixed axes.

    Returns a dict with: topology, chip, devices, hosts, mesh {data, fsdp, tensor}, params
    (count), trainable_params, batch_per_device, microbatch_per_device, grad_accum, bytes
    {params, grads, optimizer, grad_accum, gathered_weights, activations, activation_overhead}
    per device,
    activation_breakdown, total_bytes, hbm_bytes (None if unknown), usable_bytes, fits (None if
    the HBM is unknown), problems (shardings that do not divide, a batch that does not split).
    """
    if topology is None:
        fixed = math.prod(max(1, int(mesh[a])) for a in MESH_AXES)
        topology = f"cpu-{fixed}"
    topo = parse_topology(topology)
    sizes = resolve_mesh(mesh, topo.devices)
    abstract_mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    problems: list[str] = []

    model = abstract_model(config)
    variables = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(
        variables, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    specs = {path: variable_spec(v) for path, v in flat}
    params = nnx.to_pure_dict(variables)
    trainable = {
        path: leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if _trainable(path, retrofit)
    }
    trainable_tree = {jax.tree_util.keystr(p): v for p, v in trainable.items()}
    trainable_specs = {
        (jax.tree_util.DictKey(jax.tree_util.keystr(p)),): specs[p] for p in trainable
    }
    # The optimizer state exactly as optax builds it: AdamW keeps two float32 moments.
    opt_state = jax.eval_shape(optax.adamw(1e-4, b1=0.9, b2=0.95).init, trainable_tree)

    param_bytes = _sharded_bytes(params, specs, abstract_mesh, problems)
    grad_bytes = _sharded_bytes(trainable_tree, trainable_specs, abstract_mesh, [])
    opt_bytes = _sharded_bytes(opt_state, trainable_specs, abstract_mesh, [])

    batch, accum = int(batch_size), int(grad_accum)
    shards = sizes["data"] * sizes["fsdp"]
    if batch % (shards * accum):
        problems.append(
            f"train.batch_size {batch} does not split into {accum} microbatch(es) over "
            f"data x fsdp = {shards} devices"
        )
    per_device = max(1, batch // shards)
    micro = max(1, per_device // accum)
    acts = activation_bytes(
        config,
        batch=micro,
        seq_len=int(seq_len),
        neighbours=int(num_neighbours),
        tensor=sizes["tensor"],
    )
    # FSDP all-gathers a layer's weights before using them: the largest stacked layer slice
    # (two in flight while the next one is prefetched) or the output projection.
    layer_slices = [
        math.prod(leaf.shape[1:]) * 4 // (sizes["tensor"] if "tensor" in specs[p] else 1)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if p[0].key == "decoder"
    ]
    head = config.d_model * math.ceil(config.vocab_size / sizes["tensor"]) * 4
    gathered = max(2 * sum(layer_slices), head)

    out_bytes = {
        "params": param_bytes,
        "grads": grad_bytes,
        "optimizer": opt_bytes,
        "grad_accum": grad_bytes if accum > 1 else 0,
        "gathered_weights": gathered,
        "activations": sum(acts.values()),
        "activation_overhead": int(ACTIVATION_OVERHEAD * sum(acts.values())),
    }
    total = sum(out_bytes.values())
    usable = None if topo.hbm_bytes is None else int(topo.hbm_bytes * USABLE_FRACTION)
    return {
        "topology": topo.name,
        "chip": topo.chip,
        "devices": topo.devices,
        "hosts": topo.hosts,
        "mesh": sizes,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "trainable_params": sum(math.prod(x.shape) for x in trainable.values()),
        "batch_per_device": per_device,
        "microbatch_per_device": micro,
        "grad_accum": accum,
        "bytes": out_bytes,
        "activation_breakdown": acts,
        "total_bytes": total,
        "hbm_bytes": topo.hbm_bytes,
        "usable_bytes": usable,
        "fits": None if usable is None else (total <= usable and not problems),
        "problems": problems,
    }


def format_plan(plan: dict) -> str:
    """A readable table of a `memory_plan` result."""

    def gib(x: int | None) -> str:
        return "?" if x is None else f"{x / GIB:8.2f} GiB"

    mesh = " x ".join(f"{a}={plan['mesh'][a]}" for a in MESH_AXES)
    lines = [
        f"topology        {plan['topology']} ({plan['devices']} {plan['chip']} devices, "
        f"{plan['hosts']} host(s)), mesh {mesh}",
        f"parameters      {plan['params']:,} ({plan['trainable_params']:,} trained)",
        f"batch/device    {plan['batch_per_device']} sequences in {plan['grad_accum']} "
        f"microbatch(es) of {plan['microbatch_per_device']}",
    ]
    for name, value in plan["bytes"].items():
        lines.append(f"  {name:<20}{gib(value)}")
        if name == "activations":
            for part, size in plan["activation_breakdown"].items():
                lines.append(f"    {part:<18}{gib(size)}")
    verdict = {True: "fits", False: "DOES NOT FIT", None: "HBM unknown"}[plan["fits"]]
    lines.append(
        f"total/device      {gib(plan['total_bytes'])} of {gib(plan['usable_bytes'])} usable "
        f"({gib(plan['hbm_bytes']).strip()} HBM): {verdict}"
    )
    lines += [f"problem: {p}" for p in plan["problems"]]
    return "\n".join(lines)
