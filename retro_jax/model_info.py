"""`retro-jax model-info`: parameter counts, FLOPs per token and per-device training memory.

The network package (retro_jax/model/) takes a RetroConfig and a training shape and knows nothing
of the experiment config; this module reads them from one: the model (`model_config`), the mesh
and its target slice (`mesh.*`), the batch, sequence length and neighbours (`train.*`,
`data.seq_len`). Nothing is allocated: counts and plans come from `jax.eval_shape`.
"""

from __future__ import annotations

import ml_collections

from retro_jax.config import model_config
from retro_jax.model.info import describe, flops_per_token, paper_preset_of
from retro_jax.model.memory import format_plan, memory_plan
from retro_jax.sharding import MESH_AXES


def memory_plan_of(config: ml_collections.ConfigDict, *, topology: str | None = None) -> dict:
    """The per-device training memory of an experiment config (`model.memory.memory_plan`) on
    `topology`; None takes `mesh.topology` when the config names one, else a CPU host with as
    many devices as the mesh's fixed axes."""
    if topology is None:
        topology = config.mesh.get("topology", None) or None
    t = config.train
    return memory_plan(
        model_config(config),
        {axis: int(config.mesh[axis]) for axis in MESH_AXES},
        batch_size=int(t.batch_size),
        seq_len=int(config.data.seq_len),
        num_neighbours=int(t.num_neighbours),
        grad_accum=int(t.get("grad_accum", 1)),
        retrofit=bool(t.get("retrofit_from", "")),
        topology=topology,
    )


def main(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """`retro-jax model-info --config CFG`: parameter counts, FLOPs per token, and the
    per-device training memory on the config's `mesh.topology` (`memory_plan_of`)."""
    c = model_config(config)
    preset = paper_preset_of(c)
    seq_len, k = int(config.data.seq_len), int(config.train.num_neighbours)
    rows = describe(c, preset)
    flops = flops_per_token(c, seq_len, k)
    rows.append((f"train FLOPs/token (n={seq_len}, k={k})", f"{flops:.4g}"))
    if c.cca_layers:
        base = flops_per_token(c.baseline(), seq_len, 0)
        rows.append(("  baseline twin FLOPs/token", f"{base:.4g}"))
    width = max(len(name) for name, _ in rows)
    print(f"model: {'baseline twin' if c.is_baseline else 'RETRO'} {preset or ''}".rstrip())
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>16}")
    plan = memory_plan_of(config)
    print("training memory per device (parameters, AdamW state, activations):")
    print("  " + format_plan(plan).replace("\n", "\n  "))
