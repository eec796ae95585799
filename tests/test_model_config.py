"""Presets, parameter counts, the baseline twin, layer scanning, precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import SMALL, forward

from retro_jax.config import default_config, model_config
from retro_jax.errors import RetroError
from retro_jax.model import PAPER_PARAMS, Retro, RetroConfig, default_cca_layers
from retro_jax.model.info import baseline_formula, flops_per_token, param_breakdown

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.integers(1, 64, (2, 16)), jnp.int32),
        jnp.asarray(rng.integers(0, 64, (2, 4, 2, 8)), jnp.int32),
    )


def test_paper_cca_placement():
    assert default_cca_layers(12) == (6, 9, 12)
    assert default_cca_layers(24) == (9, 12, 15, 18, 21, 24)
    assert default_cca_layers(32)[0] == 9 and default_cca_layers(32)[-1] == 30
    assert RetroConfig.preset("172m").cca_layers == (6, 9, 12)
    assert RetroConfig.preset("7.5b-baseline").cca_layers == ()


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_baseline_non_embedding_count_matches_formula(preset):
    config = RetroConfig.preset(preset)
    counts = param_breakdown(config.baseline())
    formula = baseline_formula(config)
    assert abs(counts["non_embedding"] - formula) / formula < 0.02
    # The paper's count adds one d x (heads*head_size) relative-position matrix per layer.
    relpos = config.num_layers * config.d_model * config.num_heads * config.head_dim
    assert abs(formula + relpos - PAPER_PARAMS[preset][0]) / PAPER_PARAMS[preset][0] < 0.03
    retro = param_breakdown(config)
    assert retro["non_embedding"] == counts["non_embedding"]
    assert 0 < retro["retro_extra"] <= PAPER_PARAMS[preset][1] - PAPER_PARAMS[preset][0]
    assert flops_per_token(config, 2048, 2) > flops_per_token(config.baseline(), 2048, 0)


def test_baseline_twin_equals_retro_without_neighbours():
    retro = Retro(SMALL, rngs=nnx.Rngs(0))
    baseline = Retro(SMALL.baseline(), rngs=nnx.Rngs(1))
    retro_params = nnx.state(retro, nnx.Param)
    base_params = nnx.state(baseline, nnx.Param)
    assert set(retro_params.keys()) - set(base_params.keys()) == {"encoder", "cca"}
    nnx.update(baseline, nnx.State({k: retro_params[k] for k in base_params.keys()}))
    tokens, neighbours = inputs()
    np.testing.assert_array_equal(forward(baseline, tokens), forward(retro, tokens))
    assert not np.allclose(forward(retro, tokens, neighbours), forward(retro, tokens), atol=1e-4)


@pytest.mark.parametrize(
    "layers, cca_layers, remat",
    [
        (4, (2, 4), False),
        (8, (2, 4, 6), True),  # two evenly spaced blocks after the first CCA layer, then a tail
        (4, (1, 2, 3), False),  # CCA in consecutive layers: blocks without plain layers
        (6, (1, 2, 5), False),  # uneven spacing: the blocks are unrolled
    ],
)
def test_scanned_layers_equal_unrolled(layers, cca_layers, remat):
    tokens, neighbours = inputs(1)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 64)), jnp.float32)
    loss_and_grad = nnx.jit(nnx.value_and_grad(lambda m: (m(tokens, neighbours) * weights).sum()))
    config = dataclasses.replace(SMALL, num_layers=layers, cca_layers=cca_layers)
    plain = Retro(config, rngs=nnx.Rngs(0))
    scanned = Retro(dataclasses.replace(config, scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
    (l1, g1), (l2, g2) = loss_and_grad(plain), loss_and_grad(scanned)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2), strict=True):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))


def test_logits_chunk_gives_the_same_loss_and_gradients():
    tokens, neighbours = inputs(3)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 16)) < 0.8, jnp.float32)
    loss_and_grad = nnx.jit(
        nnx.value_and_grad(lambda m: (m.token_nll(tokens, neighbours, targets) * mask).sum())
    )
    whole = Retro(SMALL, rngs=nnx.Rngs(0))
    chunked = Retro(dataclasses.replace(SMALL, logits_chunk=4), rngs=nnx.Rngs(0))
    nll = nnx.jit(lambda m: m.token_nll(tokens, neighbours, targets))
    np.testing.assert_allclose(nll(whole), nll(chunked), rtol=1e-6)
    logp = jax.nn.log_softmax(forward(whole, tokens, neighbours))
    expect = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll(whole), expect, rtol=1e-5)
    (l1, g1), (l2, g2) = loss_and_grad(whole), loss_and_grad(chunked)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2), strict=True):
        np.testing.assert_allclose(a[...], b[...], atol=1e-6, err_msg=str(path))
    with pytest.raises(RetroError, match="logits_chunk 5 does not divide"):
        Retro(SMALL.replace(logits_chunk=5), rngs=nnx.Rngs(0)).token_nll(tokens, None, targets)
    with pytest.raises(RetroError, match="logits_chunk must be >= 0"):
        SMALL.replace(logits_chunk=-1)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = Retro(dataclasses.replace(SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens, neighbours = inputs(2)
    logits = forward(model, tokens, neighbours)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
    assert model.decoder["w_in"][...].dtype == jnp.float32
    full = forward(Retro(SMALL, rngs=nnx.Rngs(0)), tokens, neighbours)
    assert np.abs(np.asarray(logits) - np.asarray(full)).max() < 0.1


def test_config_errors_and_overrides():
    with pytest.raises(RetroError, match="cca_layers"):
        RetroConfig(num_layers=4, cca_layers=(5,))
    with pytest.raises(RetroError, match="unknown model preset"):
        RetroConfig.preset("13b")
    config = default_config()
    config.model.num_layers = 6
    config.model.cca_layers = (3, 6)
    assert model_config(config).cca_layers == (3, 6)
    with pytest.raises(RetroError, match="neighbours must be"):
        Retro(SMALL, rngs=nnx.Rngs(0))(inputs()[0], jnp.zeros((2, 3, 2, 8), jnp.int32))
