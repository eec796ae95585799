"""Orbax checkpoints of a run: W/checkpoints/<step>/{params,train,meta}, plus model_config.json.

Each step folder holds three items, so tools that only need weights restore only `params`:
    params  the whole model's parameters, one nested dict (trainable and frozen merged)
    train   {step, opt_state, rng}
    meta    JSON: model config, record spec, data position (global batch index, seed, batch
            size), retrofit source
Saving is asynchronous (training continues while the arrays are written); Orbax writes each step
to a temporary folder and renames it when complete, so a killed run leaves only whole
checkpoints. Paths may be local or gs://. Reading a trained model back (evaluation, sampling,
retro-fitting) is retro_jax/model/load.py, which imports nothing of training.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath

from retro_jax.errors import RetroError
from retro_jax.model.config import COMPUTE_ONLY, RetroConfig
from retro_jax.model.load import ITEMS, MODEL_CONFIG
from retro_jax.train.state import TrainState, merge_dicts, pick


class Checkpoints:
    """An Orbax CheckpointManager for TrainStates, keeping the last `keep` steps."""

    def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict) -> None:
        """Start an asynchronous save at state.step (returns before the arrays are written)."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(merge_dicts(state.params, state.frozen)),
            train=ocp.args.StandardSave(_train_item(state)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        """The state saved at `step`, laid out like `target` (arrays or ShapeDtypeStructs)."""
        full_target = merge_dicts(target.params, target.frozen)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(full_target),
                train=ocp.args.StandardRestore(_train_item(target)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        params, train = restored["params"], restored["train"]
        state = TrainState(
            step=train["step"],
            params=pick(params, target.params),
            frozen=pick(params, target.frozen),
            opt_state=train["opt_state"],
            rng=train["rng"],
        )
        return state, restored["meta"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


# ---------------------------------------------------------------- the model config beside them


def write_model_config(directory: str, config: RetroConfig) -> None:
    """W/checkpoints/model_config.json (process 0; written once, via a temporary name)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(directory) / MODEL_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (MODEL_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    tmp.replace(path)


def config_differences(saved: dict, current: dict, prefix: str) -> list[str]:
    """'prefix.key: checkpoint X, config Y' for every key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            out.append(f"{prefix}.{key}: checkpoint {a!r}, config {b!r}")
    return out


# Keys of a checkpoint's meta added after the first checkpoints were written.
RECORDED_SINCE = ("shuffle_buffer", "processes", "train_records")


def check_resumable(directory: str, step: int, meta: dict, current: dict[str, dict]) -> None:
    """RetroError naming every difference between a checkpoint and the run about to resume it.

    `current` maps sections ("model", "data", "train") to the values that must not change; model
    fields that only change how the model is computed (COMPUTE_ONLY) may.
    """
    problems = []
    for section, values in current.items():
        saved = dict(meta.get(section, {}))
        values = dict(values)
        # Checked only where the checkpoint records them (checkpoints from before they were).
        values = {k: v for k, v in values.items() if k not in RECORDED_SINCE or k in saved}
        if section == "model":
            saved = {k: v for k, v in saved.items() if k not in COMPUTE_ONLY}
            values = {k: v for k, v in values.items() if k not in COMPUTE_ONLY}
        problems += config_differences(saved, values, section)
    if problems:
        raise RetroError(
            f"config does not match the checkpoint {epath.Path(directory) / str(step)} it would "
            f"resume: {'; '.join(problems)} (use a new --workdir, or the checkpoint's settings)"
        )
