"""Retro-fitting (paper section 4.2): a trained baseline becomes RETRO's frozen decoder.

The baseline twin's parameter tree is exactly RETRO's minus `encoder` and `cca`, so its weights
fill the train state's `frozen` half unchanged, and only the freshly initialised encoder and
chunked cross-attention (`RETROFIT_TRAINABLE`) are given to the optimizer. Frozen weights never
receive an update, so with retrieval switched off (neighbours=None) the retro-fitted model
computes exactly the baseline's function, bit for bit.

The paper trains the new weights on 6M sequences (3% of pre-training) with the usual schedule:
with `train.retrofit_from` set, a run lasts ceil(train.retrofit_sequences / batch_size) steps
(6M by default; 0 keeps train.steps), with warmup and learning rate as for any run.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from retro_jax.errors import RetroError
from retro_jax.model.config import COMPUTE_ONLY, RetroConfig
from retro_jax.model.load import find_checkpoints, load_params, read_model_config
from retro_jax.train.checkpoint import config_differences
from retro_jax.train.state import TrainState


def retrofit_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a run trains with: for a retro-fit with `train.retrofit_sequences` > 0, a copy
    whose train.steps covers that many sequences; otherwise `config` itself."""
    t = config.train
    sequences = int(t.get("retrofit_sequences", 0))
    if not t.retrofit_from or sequences <= 0:
        return config
    steps = math.ceil(sequences / int(t.batch_size))
    if steps != int(t.steps):
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps = steps
    return config


# RetroConfig fields of CCA alone (the baseline twin has no CCA): they need not agree.
_CCA_OPTIONS = ("cca_sink", "cca_match_bias", "cca_running_match")


def check_baseline(baseline: RetroConfig, retro: RetroConfig, source: str) -> None:
    """RetroError unless `baseline` is the decoder of `retro` (its twin)."""
    if retro.is_baseline:
        raise RetroError(
            "train.retrofit_from needs a RETRO model (model.cca_layers must not be empty)"
        )
    if not baseline.is_baseline:
        raise RetroError(f"{source}: retrofit_from must be a baseline twin (it has cca_layers)")
    want = {k: v for k, v in retro.baseline().to_dict().items() if k not in COMPUTE_ONLY}
    have = {k: v for k, v in baseline.to_dict().items() if k not in COMPUTE_ONLY}
    # The encoder's and CCA's own fields do not shape the baseline; only the decoder's must agree.
    for d in (want, have):
        for key in [k for k in d if k.startswith("enc_") or k in _CCA_OPTIONS]:
            del d[key]
    problems = config_differences(have, want, "model")
    if problems:
        raise RetroError(
            f"{source} is not this model's baseline twin: "
            + "; ".join(p.replace("checkpoint", "baseline") for p in problems)
        )


def load_baseline(source: str, state: TrainState, retro: RetroConfig) -> tuple[TrainState, int]:
    """(state with the baseline's weights as its frozen half, the baseline checkpoint's step).

    `source`: a baseline workdir, its checkpoints folder, or one step folder in it.
    """
    directory, _ = find_checkpoints(source)
    check_baseline(read_model_config(directory), retro, source)
    if not state.frozen:
        raise RetroError("retro-fitting: the train state has no frozen parameters to fill")
    params, step = load_params(source, state.frozen)
    return dataclasses.replace(state, frozen=params), step
