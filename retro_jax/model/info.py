"""Parameter counts and analytic FLOPs of a RetroConfig (printed by `retro-jax model-info`).

Counts come from `jax.eval_shape` of the real model (nothing is allocated), split into the groups
the paper reports: Table 2 counts non-embedding parameters, and RETRO's extra parameters are the
encoder and the CCA layers.
"""

from __future__ import annotations

import jax
from flax import nnx

from retro_jax.model.config import COMPUTE_ONLY, PAPER_PARAMS, RetroConfig
from retro_jax.model.create import abstract_model


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def param_breakdown(config: RetroConfig) -> dict[str, int]:
    """Parameters by group, from the abstract model.

    `non_embedding` is the decoder without its token embedding and output head (the paper's
    Table 2 convention for the baseline); `retro_extra` is the encoder (without its embedding
    table) plus the CCA layers.
    """
    state = nnx.state(abstract_model(config), nnx.Param)
    groups = {name: _size(sub) for name, sub in state.items()}
    embedding = groups.get("embed", 0) + groups.get("head", 0)
    encoder_embedding = int(state["encoder"]["embed"].size) if "encoder" in state else 0
    decoder = groups["decoder"] + groups["final_norm"]
    extra = groups.get("encoder", 0) - encoder_embedding + groups.get("cca", 0)
    return {
        "total": sum(groups.values()),
        "embedding": embedding + encoder_embedding,
        "non_embedding": decoder,
        "encoder": groups.get("encoder", 0) - encoder_embedding,
        "cca": groups.get("cca", 0),
        "retro_extra": extra,
    }


def baseline_formula(config: RetroConfig) -> int:
    """L * (4 d h_total + 2 d d_ff): attention and FFW matrices of the decoder (no norms)."""
    c = config
    return c.num_layers * (4 * c.d_model * c.num_heads * c.head_dim + 2 * c.d_model * c.d_ff)


def flops_per_token(config: RetroConfig, seq_len: int, num_neighbours: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per decoder token, analytic.

    Matmuls count 2 FLOPs per multiply-add; attention scores and values are counted over the full
    context (the PaLM convention, causal masking not halved). RETRO adds, per decoder token,
    2k encoder tokens (k neighbours of 2m tokens per m-token chunk) and the CCA layers.
    """
    c = config
    hd, ehd = c.num_heads * c.head_dim, c.enc_num_heads * c.enc_head_dim
    macs = c.num_layers * (4 * c.d_model * hd + 2 * c.d_model * c.d_ff)  # decoder matrices
    macs += c.num_layers * 2 * seq_len * hd  # QK^T and AV over the context
    if c.cca_layers and num_neighbours > 0:
        r = 2 * c.chunk_size
        enc_tokens = num_neighbours * r / c.chunk_size  # encoder tokens per decoder token
        de = c.enc_d_model
        per_enc_token = c.enc_num_layers * (4 * de * ehd + 2 * de * c.enc_d_ff + 2 * r * ehd)
        per_enc_token += len(c.enc_cross_layers) * (2 * de * ehd + 2 * c.chunk_size * ehd)
        macs += enc_tokens * per_enc_token
        macs += len(c.enc_cross_layers) * 2 * c.d_model * ehd  # K/V of C_u, once per chunk token
        cca = 2 * c.d_model * hd + enc_tokens * 2 * de * hd + 2 * num_neighbours * r * hd
        macs += len(c.cca_layers) * cca
    return 3 * 2 * macs + head_flops_per_token(c)


def head_flops_per_token(config: RetroConfig) -> float:
    """The output head's share of `flops_per_token`: one d x V product, forward and backward."""
    return 3 * 2 * config.d_model * config.vocab_size


def describe(config: RetroConfig, preset: str | None = None) -> list[tuple[str, str]]:
    """Rows of (name, value) for model-info."""
    b = param_breakdown(config)
    rows = [
        ("parameters (total)", f"{b['total']:,}"),
        ("embedding tables", f"{b['embedding']:,}"),
        ("decoder, non-embedding", f"{b['non_embedding']:,}"),
        ("  L*(4*d*h + 2*d*d_ff)", f"{baseline_formula(config):,}"),
    ]
    if config.cca_layers:
        rows += [
            ("encoder (no embedding)", f"{b['encoder']:,}"),
            ("CCA layers " + str(config.cca_layers), f"{b['cca']:,}"),
            ("RETRO extra (encoder + CCA)", f"{b['retro_extra']:,}"),
        ]
    if preset in PAPER_PARAMS:
        base, retro = PAPER_PARAMS[preset]
        rows += [
            ("paper baseline (Table 2)", f"{base:,}"),
            ("paper RETRO extra (Table 2)", f"{retro - base:,}"),
        ]
    return rows


# Fields that change where a model retrieves, how it is computed or initialised, not its size.
_NOT_SIZE = ("cca_layers", *COMPUTE_ONLY)


def paper_preset_of(config: RetroConfig) -> str | None:
    """The paper size (`172m` ...) whose shapes a config has, whatever its CCA placement."""

    def shapes(c: RetroConfig) -> dict:
        return {k: v for k, v in c.to_dict().items() if k not in _NOT_SIZE}

    return next((p for p in PAPER_PARAMS if shapes(RetroConfig.preset(p)) == shapes(config)), None)
