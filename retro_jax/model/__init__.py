"""The RETRO network: config, presets, decoder with chunked cross-attention, neighbour encoder."""

from retro_jax.model.config import PAPER_PARAMS, PRESETS, RetroConfig, default_cca_layers
from retro_jax.model.retro import Retro

__all__ = ["PAPER_PARAMS", "PRESETS", "Retro", "RetroConfig", "default_cca_layers"]
