"""Retro-fitting: a baseline frozen inside RETRO; retrieval off = the baseline, bit for bit."""

import jax
import numpy as np
import pytest
from test_pipeline import write_fake_prepare
from test_train_step import small_config

from retro_jax.errors import RetroError
from retro_jax.model.create import create_model
from retro_jax.model.load import load_model
from retro_jax.train.loop import train
from retro_jax.train.retrofit import retrofit_schedule
from retro_jax.train.state import split_model

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(baseline workdir, retro-fitted workdir): 3 baseline steps, then 3 retro-fitting steps."""
    baseline = tmp_path_factory.mktemp("baseline")
    retrofitted = tmp_path_factory.mktemp("retrofitted")
    for workdir in (baseline, retrofitted):
        write_fake_prepare(workdir, train_files=2, records_per_file=16)
    evals = dict(eval_every=3, eval_batches=1)
    base = train(small_config("tiny-baseline", steps=3, checkpoint_every=3, **evals), str(baseline))
    config = small_config(steps=3, checkpoint_every=3, learning_rate=1e-2, **evals)
    config.train.retrofit_from = str(baseline)
    config.train.retrofit_sequences = 0  # train.steps, not the paper's 6M sequences
    out = train(config, str(retrofitted))
    assert out["step"] == 3 and "retro_eval_loss" not in base
    # held-out evaluation with retrieval off is the baseline's; with retrieval, its own
    assert out["eval_loss"] == base["eval_loss"] and out["eval_bpb"] == base["eval_bpb"]
    assert out["retro_eval_loss"] != out["eval_loss"] and out["retro_eval_bpb"] > 0
    assert not any((w / "profile").exists() for w in (baseline, retrofitted))  # off by default
    return baseline, retrofitted


def test_retrieval_off_logits_are_the_baselines_bit_for_bit(runs):
    baseline_dir, retro_dir = runs
    # (the fixture already saw equal held-out losses on the 8-device mesh; here one device)
    baseline, _ = load_model(str(baseline_dir))
    retro, step = load_model(str(retro_dir))
    assert step == 3 and not retro.config.is_baseline
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (8, 32)).astype(np.int32)
    neighbours = rng.integers(1, 64, (8, 4, 2, 16)).astype(np.int32)
    off = np.asarray(jax.jit(lambda t: retro(t, None))(tokens))
    base = np.asarray(jax.jit(lambda t: baseline(t, None))(tokens))
    on = np.asarray(jax.jit(lambda t, n: retro(t, n))(tokens, neighbours))
    np.testing.assert_array_equal(off, base)
    assert np.abs(on - base).max() > 1e-4  # the trained CCA does change the predictions


def test_only_encoder_and_cca_were_trained(runs):
    baseline_dir, retro_dir = runs
    retro, _ = load_model(str(retro_dir))
    baseline, _ = load_model(str(baseline_dir))
    _, trained, _ = split_model(retro)
    _, base_params, _ = split_model(baseline)
    fresh = create_model(retro.config, seed=0)  # the seed the run initialised with
    _, fresh_params, _ = split_model(fresh)
    for name in ("decoder", "embed", "final_norm", "head"):
        for a, b in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(base_params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("encoder", "cca"):
        moved = [
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(fresh_params[name]))
        ]
        assert all(moved), name
    assert set(trained) == set(base_params) | {"encoder", "cca"}


def test_retrofit_from_a_model_that_is_not_the_twin(runs, tmp_path):
    baseline_dir, retro_dir = runs
    write_fake_prepare(tmp_path, train_files=1, records_per_file=8)
    config = small_config(steps=3)
    config.model.d_ff = 128
    config.train.retrofit_from = str(baseline_dir)
    with pytest.raises(RetroError, match=r"not this model's baseline twin: model.d_ff"):
        train(config, str(tmp_path))
    config = small_config(steps=3)
    config.train.retrofit_from = str(retro_dir)
    with pytest.raises(RetroError, match="must be a baseline twin"):
        train(config, str(tmp_path))
    config = small_config("tiny-baseline", steps=3)
    config.train.retrofit_from = str(baseline_dir)
    with pytest.raises(RetroError, match="needs a RETRO model"):
        train(config, str(tmp_path))


def test_the_twin_check_ignores_what_does_not_shape_the_baseline():
    """A baseline is RETRO's twin whatever RETRO's encoder and CCA options (model.cca_sink,
    model.cca_match_bias, model.cca_running_match); its decoder must agree."""
    from retro_jax.model import RetroConfig
    from retro_jax.train.retrofit import check_baseline

    retro = RetroConfig(cca_sink=True, cca_match_bias=True, cca_running_match=8, enc_num_layers=3)
    check_baseline(RetroConfig(cca_layers=()), retro, "B")
    with pytest.raises(RetroError, match=r"B is not this model's baseline twin: model.d_ff"):
        check_baseline(RetroConfig(cca_layers=(), d_ff=128), retro, "B")


def test_retrofit_trains_the_papers_6m_sequences_by_default():
    config = small_config(steps=3, batch_size=256)
    assert retrofit_schedule(config) is config  # not a retro-fit: train.steps as set
    config.train.retrofit_from = "gs://b/baseline"
    assert config.train.retrofit_sequences == 6_000_000
    planned = retrofit_schedule(config)
    assert planned.train.steps == 23_438  # ceil(6M / 256): the paper's 3% of pre-training
    assert config.train.steps == 3  # the caller's config is left alone
    config.train.retrofit_sequences = 0
    assert retrofit_schedule(config).train.steps == 3


def test_a_new_retro_is_its_baseline_twin_until_cca_learns():
    """With `model.cca_zero_init` (the default) RETRO built from the same seed as its baseline
    twin computes the baseline's logits bit for bit, whatever its neighbours; the zero CCA
    outputs still get gradients, and one step down them lets the neighbours of chunk 0 reach
    exactly its attending chunk (CCA in the last layer: positions m-1 .. 2m-2, no others)."""
    from flax import nnx

    from retro_jax.model import Retro, RetroConfig

    assert RetroConfig().cca_zero_init and RetroConfig.preset("172m").cca_zero_init
    one = dict(num_layers=1, num_heads=1, head_dim=8, enc_num_layers=1, enc_num_heads=1)
    config = RetroConfig(vocab_size=16, chunk_size=2, d_model=8, d_ff=8, cca_layers=(1,),
                         enc_d_model=8, enc_head_dim=8, enc_d_ff=8, **one)  # fmt: skip
    m, n, vocab = config.chunk_size, 4 * config.chunk_size, config.vocab_size
    retro, twin = Retro(config, rngs=nnx.Rngs(3)), Retro(config.baseline(), rngs=nnx.Rngs(3))
    forward = nnx.jit(lambda model, tokens, neighbours: model(tokens, neighbours))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, (2, n)).astype(np.int32)
    for _ in range(3):
        neighbours = rng.integers(0, vocab, (2, n // m, 2, 2 * m)).astype(np.int32)
        expected = forward(twin, tokens, None)
        np.testing.assert_array_equal(forward(retro, tokens, neighbours), expected)

    def loss(model):
        return model.token_nll(tokens, neighbours, np.roll(tokens, -1, axis=1)).mean()

    grads = nnx.jit(nnx.grad(loss))(retro)
    assert np.abs(np.asarray(grads.cca["attn"]["o"][...])).max() > 0
    retro.cca["attn"]["o"][...] -= 0.5 * grads.cca["attn"]["o"][...]
    other = neighbours.copy()
    other[:, 0] = rng.integers(0, vocab, other[:, 0].shape)
    moved = np.abs(np.asarray(forward(retro, tokens, other) - forward(retro, tokens, neighbours)))
    moved = moved.max(axis=(0, 2))  # [n]
    assert (moved[m - 1 : 2 * m - 1] > 0).all(), moved
    assert not moved[: m - 1].any() and not moved[2 * m - 1 :].any(), moved
