"""The paper's configs: hyperparameters as published, and each one fits its chip, checked on CPU.

Every plan is built with jax.eval_shape (model and optax AdamW state) on an AbstractMesh of the
config's target topology: nothing of the paper sizes is allocated.
"""

import math
from pathlib import Path

import jax
import pytest
from flax import nnx

from retro_jax.config import model_config
from retro_jax.errors import RetroError
from retro_jax.model.create import abstract_model
from retro_jax.model.memory import (
    GIB,
    activation_bytes,
    format_plan,
    parse_topology,
    resolve_mesh,
)
from retro_jax.model_info import main as info_main
from retro_jax.model_info import memory_plan_of
from retro_jax.sweep import load_module

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
FILES = {
    "172m": "retro_172m.py",
    "425m": "retro_425m.py",
    "1.5b": "retro_1_5b.py",
    "7.5b": "retro_7_5b.py",
}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "h100": 80}


def config_of(size: str, arg: str = ""):
    return load_module(EXPERIMENTS / FILES[size]).get_config(arg)


# The slice each paper config is planned for (docs/experiments.md).
TOPOLOGY = {"172m": "v5e-256", "425m": "v4-256", "1.5b": "v5p-128", "7.5b": "v5p-512"}


def closed_form_params(c) -> int:
    """Every weight of the model, counted by hand from its shapes: token embedding and output
    head, per decoder layer 4 attention and 2 FFW matrices and 2 norms, the final norm; RETRO
    adds the encoder (its own embedding, layers, the cross-attention to C_u whose keys and values
    come from the decoder's width, norms) and per CCA layer queries and output at the decoder's
    width, keys and values from the encoder's, and a norm."""
    d, h = c.d_model, c.num_heads * c.head_dim
    total = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    total += c.num_layers * (4 * d * h + 2 * d * c.d_ff + 2 * d) + d
    if c.cca_layers:
        de, he = c.enc_d_model, c.enc_num_heads * c.enc_head_dim
        total += c.vocab_size * de
        total += c.enc_num_layers * (4 * de * he + 2 * de * c.enc_d_ff + 2 * de) + de
        total += len(c.enc_cross_layers) * (2 * de * he + 2 * d * he + de) + d
        total += len(c.cca_layers) * (2 * d * h + 2 * de * h + d)
    return total


@pytest.mark.parametrize("size", FILES)
@pytest.mark.parametrize("arg", ["", "baseline", "retrofit=gs://bucket/baseline"])
def test_paper_config_fits_its_topology(size, arg):
    config = config_of(size, arg)
    plan = memory_plan_of(config)
    print(f"\n{FILES[size]}:{arg}\n{format_plan(plan)}")
    assert plan["topology"] == TOPOLOGY[size]
    assert plan["problems"] == []
    assert plan["fits"], format_plan(plan)
    assert plan["total_bytes"] <= HBM_GIB[plan["chip"]] * GIB
    assert plan["params"] == closed_form_params(model_config(config))
    if arg.startswith("retrofit"):
        # Only the encoder and the CCA layers train: under 30% of all weights at every size.
        assert 0 < plan["trainable_params"] < 0.3 * plan["params"]
    else:
        assert plan["trainable_params"] == plan["params"]


@pytest.mark.parametrize("size", FILES)
def test_paper_hyperparameters(size):
    c = config_of(size)
    big = size == "7.5b"
    assert c.data.seq_len == 2048 and c.model.chunk_size == 64
    assert c.train.batch_size == (1024 if big else 256)
    assert c.train.learning_rate == (1e-4 if big else 2e-4)
    assert c.train.warmup_steps == 750 and c.train.min_lr_ratio == 0.1
    assert c.train.warmup_from == 1e-7
    assert c.train.weight_decay == 0.1 and (c.train.b1, c.train.b2) == (0.9, 0.95)
    assert c.train.num_neighbours == 2
    tokens = c.train.steps * c.train.batch_size * c.data.seq_len
    assert 419.4e9 <= tokens < 419.4e9 + c.train.batch_size * c.data.seq_len
    assert c.model.dtype == "bfloat16" and c.model.scan_layers
    assert c.model.remat == (size in ("1.5b", "7.5b"))
    assert c.train.batch_size % (c.train.grad_accum * c.mesh.data * c.mesh.fsdp) == 0
    retro, baseline = model_config(c), model_config(config_of(size, "baseline"))
    assert baseline == retro.baseline() and retro.cca_layers


@pytest.mark.parametrize("size", FILES)
@pytest.mark.parametrize("arg", ["", "baseline", "topology=v4-256"])
def test_model_info_prints_counts_and_the_memory_plan(size, arg, capsys):
    config = config_of(size, arg)
    info_main(config)
    out = capsys.readouterr().out
    kind = "baseline twin" if arg == "baseline" else "RETRO"
    assert out.startswith(f"model: {kind} {size}\n")  # the paper size is recognised
    assert "paper baseline (Table 2)" in out
    plan = memory_plan_of(config)
    assert f"topology        {plan['topology']} (" in out
    assert f"parameters      {plan['params']:,} (" in out
    assert out.rstrip().endswith(": fits")


def test_model_info_on_a_config_without_topology(capsys):
    info_main(load_module(EXPERIMENTS / "tiny.py").get_config(""))
    out = capsys.readouterr().out
    assert out.startswith("model: RETRO\n") and "topology        cpu-1 (" in out
    assert out.rstrip().endswith("HBM unknown")


def test_retrofit_config():
    c = config_of("172m", "retrofit=gs://b/retro_172m-baseline")
    assert c.train.retrofit_from == "gs://b/retro_172m-baseline"
    assert c.train.steps * c.train.batch_size >= 6_000_000  # paper 4.2: 6M sequences
    assert model_config(c).cca_layers == (6, 9, 12)
    with pytest.raises(RetroError, match="retrofit"):
        config_of("172m", "retrofit")
    with pytest.raises(RetroError, match="exclude"):
        config_of("172m", "baseline,retrofit=gs://b/x")
    with pytest.raises(RetroError, match="expected baseline"):
        config_of("172m", "bogus")


@pytest.mark.parametrize(
    "size,topology",
    [("172m", "v4-64"), ("425m", "v5e-256"), ("1.5b", "h100-8"), ("7.5b", "v5p-128")],
)
def test_topology_argument_chooses_a_mesh_that_fits(size, topology):
    config = config_of(size, f"topology={topology}")
    plan = memory_plan_of(config)
    assert plan["topology"] == topology and plan["fits"], format_plan(plan)
    assert math.prod(plan["mesh"].values()) == parse_topology(topology).devices


def test_topology_that_cannot_fit_is_an_error():
    with pytest.raises(RetroError, match="no mesh"):
        config_of("7.5b", "topology=v5e-8")


def test_parse_topology():
    assert parse_topology("v5p-128").devices == 64  # v5p names TensorCores, 2 per chip
    assert parse_topology("v4-256").devices == 128
    assert parse_topology("v5e-256").devices == 256
    assert parse_topology("v5litepod-16").chip == "v5e"
    assert parse_topology("v5e-256").hbm_bytes == 16 * GIB
    assert parse_topology("v5p-128").hbm_bytes == 95 * GIB
    assert parse_topology("h100-8").hbm_bytes == 80 * GIB
    assert parse_topology("v4-256").hosts == 32
    assert parse_topology("cpu-8").hbm_bytes is None
    for bad in ("tpu-8", "v4-3", "v5p"):
        with pytest.raises(RetroError):
            parse_topology(bad)


def test_resolve_mesh():
    assert resolve_mesh({"data": -1, "fsdp": 16, "tensor": 2}, 128) == {
        "data": 4,
        "fsdp": 16,
        "tensor": 2,
    }
    with pytest.raises(RetroError, match="needs"):
        resolve_mesh({"data": 2, "fsdp": 16, "tensor": 1}, 64)
    with pytest.raises(RetroError, match="-1"):
        resolve_mesh({"data": -1, "fsdp": -1, "tensor": 1}, 64)


def test_memory_accounting_by_hand():
    """Tiny model on 8 devices: params, grads and AdamW moments sum exactly as sharded."""
    config = load_module(EXPERIMENTS / "tiny.py").get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    config.train.batch_size = 8
    plan = memory_plan_of(config, topology="h100-8")
    state = nnx.state(abstract_model(model_config(config)), nnx.Param)
    # Every leaf: shard it by hand from its logical names (embed -> fsdp=4, heads/mlp/vocab ->
    # tensor=2).
    expected = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata()["out_sharding"]
        ways = {"embed": 4, "mlp": 2, "heads": 2, "vocab": 2}
        size = math.prod(s // ways.get(n, 1) for s, n in zip(var.shape, names))
        expected += size * 4
    assert plan["bytes"]["params"] == expected
    assert plan["bytes"]["grads"] == expected
    assert plan["bytes"]["optimizer"] == 2 * expected + 4  # mu, nu and the int32 step count
    assert plan["bytes"]["grad_accum"] == 0
    assert plan["batch_per_device"] == 2 and plan["fits"]


def test_problems_reported():
    config = load_module(EXPERIMENTS / "tiny.py").get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 3  # 4 heads over 3 ways
    config.train.batch_size = 3
    plan = memory_plan_of(config, topology="cpu-6")
    assert plan["fits"] is None  # unknown HBM
    assert any("does not divide" in p for p in plan["problems"])
    assert any("batch_size 3" in p for p in plan["problems"])
    config.mesh.data = -1
    plan = memory_plan_of(config, topology="h100-12")
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 3}
    assert plan["fits"] is False  # it would fit in 80 GiB, but the shardings do not divide


def test_activation_estimate_follows_remat_batch_and_tensor():
    c = model_config(config_of("425m"))
    kw = dict(seq_len=2048, neighbours=2)
    full = activation_bytes(c.replace(remat=False), batch=2, tensor=1, **kw)
    remat = activation_bytes(c.replace(remat=True), batch=2, tensor=1, **kw)
    assert remat["decoder"] < full["decoder"] / 4
    double = activation_bytes(c, batch=4, tensor=1, **kw)
    assert sum(double.values()) == 2 * sum(full.values())
    split = activation_bytes(c, batch=2, tensor=4, **kw)
    assert split["logits_and_loss"] == full["logits_and_loss"] // 4
    assert "encoder" not in activation_bytes(c.baseline(), batch=2, tensor=1, **kw)
    assert "encoder" not in activation_bytes(c, batch=2, tensor=1, seq_len=2048, neighbours=0)
