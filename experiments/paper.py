"""The paper's training setup for its four model sizes, on a named TPU slice, and its ablations.

Shared by experiments/retro_172m.py ... retro_7_5b.py. Hyperparameters are those of Borgeaud et
al. (2021), the sizes of Table 2 and the training setup of appendix C: 2048-token sequences in
chunks of 64 (section 2.2), 419.4B training tokens, batch 256 (1024 for 7.5B), AdamW with weight
decay 0.1 and betas 0.9/0.95, a linear warmup from 1e-7 over 750 steps then a cosine decay to
0.1x the peak learning rate of 2e-4 (1e-4 for 7.5B), k = 2 neighbours in training, bfloat16
compute, scanned decoder layers.

The config argument is a comma-separated list of options:
  baseline            the baseline twin (the same decoder without encoder and CCA)
  retrofit=DIR        retro-fit a trained baseline twin whose workdir (or checkpoint) is DIR
  topology=NAME       another TPU slice (e.g. v4-256, v5e-256, v5p-128, h100-8): the mesh and
                      gradient accumulation are then chosen so the plan fits the chip's HBM
e.g. `--config experiments/retro_1_5b.py:baseline,topology=v4-256`.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from retro_jax.config import default_config, model_config_dict
from retro_jax.errors import RetroError
from retro_jax.model.memory import parse_topology
from retro_jax.model_info import memory_plan_of
from retro_jax.sweep import Run

TRAIN_TOKENS = 419_400_000_000
SEQ_LEN = 2048
WARMUP_STEPS = 750
RETROFIT_SEQUENCES = 6_000_000  # paper 4.2: retro-fitting sees 6M sequences (3% of pretraining)
NEIGHBOURS_STORED = 4  # k = 1, 2, 4 in the neighbour ablation


@dataclasses.dataclass(frozen=True)
class PaperSize:
    """One model size: its preset, the paper's batch and learning rate, and a TPU slice for it."""

    preset: str
    batch_size: int
    learning_rate: float
    topology: str
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    grad_accum: int
    remat: bool


# Each slice is chosen so that memory_plan_of fits with room to spare (tests/test_experiment_configs
# checks it); fsdp shards parameters and optimizer state (the paper's ZeRO-style sharding).
SIZES: dict[str, PaperSize] = {
    "172m": PaperSize("172m", 256, 2e-4, "v5e-256", (16, 16, 1), 1, False),
    "425m": PaperSize("425m", 256, 2e-4, "v4-256", (8, 16, 1), 1, False),
    "1.5b": PaperSize("1.5b", 256, 2e-4, "v5p-128", (1, 64, 1), 1, True),
    "7.5b": PaperSize("7.5b", 1024, 1e-4, "v5p-512", (1, 128, 2), 2, True),
}


@dataclasses.dataclass(frozen=True)
class Options:
    baseline: bool = False
    retrofit_from: str = ""
    topology: str = ""


def parse_options(arg: str) -> Options:
    """`baseline`, `retrofit=DIR`, `topology=NAME`, comma-separated (see the module docstring)."""
    values: dict = {}
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, _, value = token.partition("=")
        if token == "baseline":
            values["baseline"] = True
        elif key == "retrofit" and value:
            values["retrofit_from"] = value
        elif key == "topology" and value:
            values["topology"] = value
        else:
            raise RetroError(
                f"config argument {token!r}: expected baseline, retrofit=DIR or topology=NAME"
            )
    options = Options(**values)
    if options.baseline and options.retrofit_from:
        raise RetroError("config argument: baseline and retrofit= exclude each other")
    return options


def paper_config(size: str, arg: str = "") -> ml_collections.ConfigDict:
    """The experiment config of one paper size (`172m`, `425m`, `1.5b`, `7.5b`)."""
    spec = SIZES[size]
    options = parse_options(arg)
    c = default_config()
    preset = spec.preset + ("-baseline" if options.baseline else "")
    c.model = model_config_dict(preset, dtype="bfloat16", scan_layers=True, remat=spec.remat)

    # MassiveText is not public; C4 is what the paper evaluates on and TFDS serves.
    c.data.train_source = "tfds:c4/en:train:text"
    c.data.eval_source = "tfds:c4/en:validation:text"
    c.data.retrieval_source = ""  # the training source, as the paper's training database
    c.data.seq_len = SEQ_LEN
    c.data.vocab_size = c.model.vocab_size  # SentencePiece, 128k (paper section 2.1)
    c.data.num_neighbours_stored = NEIGHBOURS_STORED
    c.data.records_per_shard = 4096
    c.data.chunks_per_shard = 1 << 20
    # The ablations' keys (defaults in retro_jax/config.py); see docs/experiments.md.
    c.data.neighbour_continuation = True  # neighbours are [N, F]; False blanks F (pipeline)
    c.data.retrieval_max_tokens = 0  # cap on the retrieval database (0 = all of it)
    c.eval.checkpoint_workdir = ""  # evaluate the checkpoint of another workdir ("" = this one)

    c.train.batch_size = spec.batch_size
    c.train.steps = math.ceil(TRAIN_TOKENS / (spec.batch_size * SEQ_LEN))
    c.train.learning_rate = spec.learning_rate
    c.train.warmup_steps = WARMUP_STEPS
    c.train.min_lr_ratio = 0.1
    c.train.weight_decay = 0.1
    c.train.b1, c.train.b2 = 0.9, 0.95
    c.train.grad_clip = 1.0
    c.train.num_neighbours = 2
    c.train.grad_accum = spec.grad_accum
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.eval_batches = 16
    c.eval.num_neighbours = 2
    c.eval.batch_size = spec.batch_size
    c.eval.neighbour_sweep = (1, 2, 4)

    c.mesh.topology = spec.topology
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = spec.mesh

    if options.retrofit_from:
        for key, value in retrofit_overrides(spec, options.retrofit_from).items():
            section, field = key.split(".")
            c[section][field] = value
    if options.topology:
        fit_to_topology(c, options.topology)
    return c


def retrofit_overrides(spec: PaperSize, baseline_dir: str) -> dict:
    """Retro-fitting (paper 4.2): train only encoder + CCA on 6M sequences from a baseline."""
    return {
        "train.retrofit_from": baseline_dir,
        "train.steps": math.ceil(RETROFIT_SEQUENCES / spec.batch_size),
    }


def fit_to_topology(config: ml_collections.ConfigDict, topology: str) -> None:
    """Choose mesh and gradient accumulation for `topology`, in place, so that the plan fits.

    Tries tensor parallelism 1, 2, 4, 8 (dividing the heads), fsdp over all remaining devices
    for models of 1B+ parameters (else 16-way, the rest data parallel), and for each the smallest
    power-of-two gradient accumulation that fits.
    """
    topo = parse_topology(topology)
    config.mesh.topology = topo.name
    batch = int(config.train.batch_size)
    big = config.model.d_model >= 2048
    tried = []
    for tensor in (1, 2, 4, 8):
        shards = topo.devices // tensor
        if config.model.num_heads % tensor or topo.devices % tensor or batch % shards:
            continue
        fsdp = shards if big else math.gcd(shards, 16)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shards // fsdp, fsdp, tensor
        accum = 1
        while accum <= batch // shards:
            config.train.grad_accum = accum
            plan = memory_plan_of(config)
            if plan["fits"] or plan["fits"] is None:
                return
            tried.append(f"tensor={tensor} grad_accum={accum}")
            accum *= 2
    raise RetroError(
        f"no mesh found for model d_model={config.model.d_model} with batch {batch} on "
        f"{topology} ({topo.devices} devices); tried {', '.join(tried) or 'nothing that divides'}"
    )


# -- the paper's ablations (appendix D; database sizes: section 4.1; retro-fitting: 4.2) --------


def cca_placements(num_layers: int) -> dict[str, tuple[int, ...]]:
    """CCA layers of the placement ablation (1-based): the default is kept as the reference."""
    start = 6 if num_layers <= 15 else 9
    return {
        "paper": tuple(range(start, num_layers + 1, 3)),
        "layer6": (6,),
        "every3-from1": tuple(range(1, num_layers + 1, 3)),
        "every-layer": tuple(range(1, num_layers + 1)),
    }


# Evaluation database sizes of the paper's figure (tokens; 0 = the whole database).
EVAL_DATABASE_TOKENS = {
    "2b": 2_000_000_000,
    "9b": 9_000_000_000,
    "90b": 90_000_000_000,
    "360b": 360_000_000_000,
    "900b": 900_000_000_000,
    "full": 0,
}
TRAIN_AND_EVAL = ("prepare", "train", "eval")


def paper_sweeps(size: str, arg: str = "") -> dict[str, list[Run]]:
    """Ablation name -> runs. A run's workdir is `{root}/{sweep}-{run}`; `{root}` is the sweep's."""
    options = parse_options(arg)
    if options.baseline:
        return {}  # every ablation varies retrieval
    spec = SIZES[size]
    baseline_dir = "{root}/retrofit-baseline"
    sweeps = {
        "neighbours": [
            Run(f"k{k}", {"train.num_neighbours": k, "eval.num_neighbours": k}, TRAIN_AND_EVAL)
            for k in (1, 2, 4)
        ],
        "cca": [
            Run(name, {"model.cca_layers": layers}, TRAIN_AND_EVAL)
            for name, layers in cca_placements(_num_layers(spec)).items()
        ],
        "continuation": [
            Run("with", {"data.neighbour_continuation": True}, TRAIN_AND_EVAL),
            Run("without", {"data.neighbour_continuation": False}, TRAIN_AND_EVAL),
        ],
        # One model, evaluated against databases of growing size.
        "eval_db": [Run("model", {}, ("prepare", "train"))]
        + [
            Run(
                f"db-{name}",
                {
                    "data.retrieval_max_tokens": tokens,
                    "eval.checkpoint_workdir": "{root}/eval_db-model",
                },
                ("prepare", "eval"),
            )
            for name, tokens in EVAL_DATABASE_TOKENS.items()
        ],
        # The headline comparison and retro-fitting: baseline twin, RETRO, retro-fitted baseline.
        "retrofit": [
            Run("baseline", {"model.cca_layers": ()}, TRAIN_AND_EVAL),
            Run("retro", {"eval.baseline_workdir": baseline_dir}, TRAIN_AND_EVAL),
            Run(
                "retrofit",
                {**retrofit_overrides(spec, baseline_dir), "eval.baseline_workdir": baseline_dir},
                TRAIN_AND_EVAL,
            ),
        ],
    }
    if options.retrofit_from:
        sweeps.pop("retrofit")
    return sweeps


def _num_layers(spec: PaperSize) -> int:
    return model_config_dict(spec.preset).num_layers
