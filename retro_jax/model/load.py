"""A trained model from its checkpoints, for inference: evaluation, sampling, retro-fitting.

Training writes W/checkpoints/<step>/{params,train,meta} and W/checkpoints/model_config.json
(retro_jax/train/checkpoint.py); this module only reads them, and imports nothing of training
(no optimizer, no train state), so loading weights to score or sample pulls in neither. Paths
may be a workdir, its `checkpoints/` folder or one step folder, local or gs://.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from retro_jax.errors import RetroError
from retro_jax.model.config import RetroConfig

MODEL_CONFIG = "model_config.json"
ITEMS = ("params", "train", "meta")  # the items of each step folder


def find_checkpoints(path: str) -> tuple[str, int | None]:
    """(Orbax root, step or None = latest) of a workdir, a checkpoints folder or a step folder."""
    p = epath.Path(path)
    if (p / "checkpoints" / MODEL_CONFIG).exists():
        return str(p / "checkpoints"), None
    if (p / MODEL_CONFIG).exists():
        return str(p), None
    if p.name.isdigit() and (p.parent / MODEL_CONFIG).exists():
        return str(p.parent), int(p.name)
    raise RetroError(f"{path}: no retro-jax checkpoints here (looked for {MODEL_CONFIG})")


def checkpoint_steps(path: str) -> list[int]:
    """The saved steps of the checkpoints that find_checkpoints(path) finds, as Orbax lists them."""
    root, _ = find_checkpoints(path)
    manager = ocp.CheckpointManager(root, item_names=ITEMS)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_model_config(directory: str) -> RetroConfig:
    path = epath.Path(directory) / MODEL_CONFIG
    if not path.exists():
        raise RetroError(f"{path} not found: not a retro-jax checkpoint folder")
    return RetroConfig.from_dict(json.loads(path.read_text()))


def read_meta(directory: str, step: int) -> dict:
    """The JSON `meta` item of one checkpoint of an Orbax root (the run's model config, record
    spec, data position and settings)."""
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()


def load_params(path: str, target: dict, step: int | None = None) -> tuple[dict, int]:
    """(parameters of the whole model, step) from a workdir / checkpoints folder / step folder.

    `target` gives the tree, shapes, dtypes and shardings (arrays or ShapeDtypeStructs).
    """
    directory, found_step = find_checkpoints(path)
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    step = step if step is not None else found_step
    step = manager.latest_step() if step is None else step
    if step is None:
        raise RetroError(f"{directory}: no finished checkpoint")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target,
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )
    manager.close()
    return restored["params"], step


def load_model(
    path: str, *, mesh: jax.sharding.Mesh | None = None, step: int | None = None
) -> tuple[Any, int]:
    """(Retro with trained weights, step) of a checkpoint, built from its model_config.json.

    Nothing is initialised: the weights are read straight into their shardings on `mesh` (or
    onto the default device).
    """
    from flax import nnx

    from retro_jax.model.create import abstract_model
    from retro_jax.sharding import state_shardings

    directory, _ = find_checkpoints(path)
    graphdef, state = nnx.split(abstract_model(read_model_config(directory)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state.to_pure_dict())
    else:
        shardings = state_shardings(state, mesh).to_pure_dict()
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state.to_pure_dict(),
        shardings,
    )
    params, step = load_params(path, target, step)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), step
