"""RetroConfig: the frozen dataclass the model sees inside jit, and the paper's presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from retro_jax.errors import RetroError


def default_cca_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's placement (Table 10): every 3rd layer from 6 (<= 15 layers) or from 9."""
    start = 6 if num_layers <= 15 else 9
    return tuple(range(start, num_layers + 1, 3))


# RetroConfig fields that change only how the model is computed (or first initialised), not what
# its weights are: they may differ between a checkpoint and the run that resumes or loads it.
COMPUTE_ONLY = ("dtype", "remat", "scan_layers", "logits_chunk", "cca_zero_init")


@dataclasses.dataclass(frozen=True)
class RetroConfig:
    """Shapes and options of a RETRO decoder + neighbour encoder.

    Layer indices in `cca_layers` are 1-based, as in the paper. `cca_layers=()` is the baseline
    twin: the same decoder with no encoder and no chunked cross-attention.
    """

    vocab_size: int = 512
    chunk_size: int = 16  # m: tokens per retrieval chunk; neighbours hold 2m tokens
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    head_dim: int = 16
    d_ff: int = 256
    cca_layers: tuple[int, ...] = (2, 4)
    # Neighbour encoder (bidirectional, weights shared over neighbours and chunks).
    enc_d_model: int = 64
    enc_num_layers: int = 2
    enc_num_heads: int = 4
    enc_head_dim: int = 16
    enc_d_ff: int = 256
    enc_cross_layers: tuple[int, ...] = (1,)  # 1-based encoder layers that attend to C_u
    # CCA output projections start at zero, so a new RETRO computes exactly the function of its
    # baseline twin built with the same seed, and a retro-fit starts from the baseline itself;
    # retrieval then enters only as far as training finds it useful. False draws them like
    # every other weight (the paper does not say how CCA is initialised).
    cca_zero_init: bool = True
    # Beyond the paper: each CCA head also attends to a key of its own whose value is zero, with
    # a learned logit (zero at first), so a chunk whose neighbours do not help can take nothing
    # from them; without it every query's attention sums to one over the neighbours' tokens.
    cca_sink: bool = False
    # Beyond the paper: each CCA head adds to the logits of a neighbour's tokens a learned multiple
    # (zero at first) of that neighbour's match with the chunk that retrieved it, the share of
    # C_u's tokens its first m tokens hold in place (`cca.neighbour_match`): a signal, causal
    # since C_u is complete before its neighbours are read, of whether the neighbour continues
    # the text, which a small model otherwise has to learn to compute from the neighbours' states.
    cca_match_bias: bool = False
    # Beyond the paper: each CCA head adds to the logits of a neighbour's tokens a learned multiple
    # (zero at first) of how well the neighbour still fits where each query reads it: the share
    # of the query's last `cca_running_match` tokens (itself included, none after it) that the
    # neighbour holds at the same offsets (`cca.running_match`). Where a copy stops, its match
    # falls within a few tokens, so with `cca_sink` a head can stop reading it. 0 = off.
    cca_running_match: int = 0
    pad_id: int = 0
    activation: str = "gelu"  # gelu (the paper's GPT-2-like FFW) | relu | silu
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    remat: bool = False  # rematerialise each block in the backward pass
    scan_layers: bool = False  # stack homogeneous layers and scan over them (fast compiles)
    # Loss and evaluation: compute the logits this many positions at a time (a divisor of the
    # sequence length) and recompute them in the backward pass, so no [batch, n, vocab] array
    # is held; 0 = all positions at once.
    logits_chunk: int = 0

    def __post_init__(self):
        problems = []
        if self.d_model <= 0 or self.num_layers <= 0 or self.chunk_size <= 0:
            problems.append("d_model, num_layers and chunk_size must be positive")
        bad = [i for i in self.cca_layers if not 1 <= i <= self.num_layers]
        if bad:
            problems.append(f"cca_layers {bad} outside 1..num_layers={self.num_layers}")
        if tuple(sorted(set(self.cca_layers))) != tuple(self.cca_layers):
            problems.append(f"cca_layers {self.cca_layers} must be strictly increasing")
        bad_enc = [i for i in self.enc_cross_layers if not 1 <= i <= self.enc_num_layers]
        if bad_enc:
            problems.append(f"enc_cross_layers {bad_enc} outside 1..{self.enc_num_layers}")
        if not 0 <= self.cca_running_match <= 2 * self.chunk_size:
            problems.append(
                f"cca_running_match must be in 0..2*chunk_size={2 * self.chunk_size} (tokens), "
                f"got {self.cca_running_match}"
            )
        if self.logits_chunk < 0:
            problems.append(f"logits_chunk must be >= 0, got {self.logits_chunk}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.activation not in ("gelu", "relu", "silu"):
            problems.append(f"activation must be gelu, relu or silu, got {self.activation!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            problems.append(f"pad_id {self.pad_id} outside the vocabulary [0, {self.vocab_size})")
        if problems:
            raise RetroError("model config: " + "; ".join(problems))

    @property
    def is_baseline(self) -> bool:
        return not self.cca_layers

    def baseline(self) -> RetroConfig:
        """The baseline twin: same decoder, no retrieval."""
        return dataclasses.replace(self, cca_layers=())

    def replace(self, **changes: Any) -> RetroConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> RetroConfig:
        """From a dict or ConfigDict; a `preset` key starts from that preset."""
        values = dict(values)
        preset = values.pop("preset", None)
        base = cls.preset(preset) if preset else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RetroError(f"model config: unknown field(s) {unknown}")
        for key in ("cca_layers", "enc_cross_layers"):
            if key in values and values[key] is not None:
                values[key] = tuple(int(i) for i in values[key])
        return dataclasses.replace(base, **values)

    @classmethod
    def preset(cls, name: str) -> RetroConfig:
        """`tiny`, `172m`, `425m`, `1.5b`, `7.5b`; suffix `-baseline` for the baseline twin."""
        baseline = name.endswith("-baseline")
        key = name.removesuffix("-baseline")
        if key not in PRESETS:
            raise RetroError(
                f"unknown model preset {name!r}; choose from "
                + ", ".join(sorted(PRESETS) + [p + "-baseline" for p in sorted(PRESETS)])
            )
        config = cls(**PRESETS[key])
        return config.baseline() if baseline else config


def _paper(d: int, d_ff: int, heads: int, head_dim: int, layers: int) -> dict[str, Any]:
    # Encoder: 2 layers of width 896 at every size (paper section 2.4); its head count and FFW
    # width are not stated: 14 heads of 64 and 4x width, the decoder's ratios at 172M.
    return dict(
        vocab_size=128_000,
        chunk_size=64,
        num_layers=layers,
        d_model=d,
        num_heads=heads,
        head_dim=head_dim,
        d_ff=d_ff,
        cca_layers=default_cca_layers(layers),
        enc_d_model=896,
        enc_num_layers=2,
        enc_num_heads=14,
        enc_head_dim=64,
        enc_d_ff=3584,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "172m": _paper(896, 3584, 16, 64, 12),
    "425m": _paper(1536, 6144, 12, 128, 12),
    "1.5b": _paper(2048, 8192, 16, 128, 24),
    "7.5b": _paper(4096, 16384, 32, 128, 32),
}

# Table 2 of the paper, non-embedding parameters: (baseline, RETRO).
PAPER_PARAMS: dict[str, tuple[int, int]] = {
    "172m": (132_000_000, 172_000_000),
    "425m": (368_000_000, 425_000_000),
    "1.5b": (1_309_000_000, 1_451_000_000),
    "7.5b": (6_982_000_000, 7_532_000_000),
}
