"""The jitted train step: learns, shards without changing the maths, accumulates exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_configs import TWO_LAYERS

from retro_jax.config import default_config, model_config, model_config_dict
from retro_jax.model.create import create_model
from retro_jax.sharding import make_mesh, shard_batch
from retro_jax.train.state import init_state
from retro_jax.train.step import (
    batch_shardings,
    decay_mask,
    distract_retrieval,
    drop_retrieval,
    lr_schedule,
    make_optimizer,
    make_train_step,
    token_losses,
)

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

# A small RETRO: 2 decoder layers, CCA at layer 2, chunks of 8, sequences of 32.
SMALL_MODEL = dict(TWO_LAYERS, vocab_size=64, chunk_size=8)


def small_config(preset: str = "tiny", **train):
    """The experiment config the train tests share (tiny shapes, quick to compile)."""
    config = default_config()
    baseline = {"cca_layers": ()} if preset.endswith("-baseline") else {}
    config.model = model_config_dict(preset, **{**SMALL_MODEL, **baseline})
    config.data.seq_len = 32
    config.data.num_neighbours_stored = 4
    config.train.update(
        dict(
            steps=20,
            batch_size=8,
            warmup_steps=2,
            learning_rate=3e-3,
            log_every=1,
            eval_every=0,
            checkpoint_every=100,
            eval_batches=2,
        )
    )
    config.train.update(train)
    config.eval.batch_size = 8
    return config


def fake_batch(seed=0, batch=8, n=32, m=8, k=2, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, n + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": (rng.random((batch, n)) < 0.9).astype(np.float32),
        "target_bytes": rng.integers(1, 4, (batch, n)).astype(np.int32),
        "neighbours": rng.integers(0, vocab, (batch, n // m, k, 2 * m)).astype(np.int32),
        "doc_id": np.arange(batch, dtype=np.int32),
    }


_MODELS = {}


def run_steps(config, mesh, batch, steps, *, retrieval=True):
    """`steps` steps on one batch; models are created once per (model, mesh) and copied."""
    tx, schedule = make_optimizer(config.train)
    key = (str(config.model), str(mesh))
    if key not in _MODELS:
        _MODELS[key] = create_model(model_config(config), mesh=mesh, seed=0)
    model_def, state, shardings = init_state(_MODELS[key], tx, mesh=mesh)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input: keep the cached model
    with jax.set_mesh(mesh):
        global_batch = shard_batch(batch, mesh)
        step = make_train_step(
            model_def,
            tx,
            schedule,
            retrieval=retrieval,
            grad_accum=int(config.train.grad_accum),
            state_shardings=shardings,
            batch_shardings=batch_shardings(global_batch, mesh),
        )
        metrics = []
        for _ in range(steps):
            state, m = step(state, global_batch)
            metrics.append(jax.device_get(m))
    return state, metrics


def one_device():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def cube():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def runs():
    """8 steps on one repeated batch, on one device and on a (2, 2, 2) mesh of 8."""
    batch = fake_batch(1)
    return {
        name: run_steps(small_config(), mesh(), batch, 8)
        for name, mesh in (("one", one_device), ("cube", cube))
    }


def test_loss_decreases_on_a_repeated_batch(runs):
    for _, metrics in runs.values():
        losses = [float(m["loss"]) for m in metrics]
        assert all(bool(m["finite"]) for m in metrics)
        assert losses[-1] < losses[0] - 0.5, losses


def test_sharded_step_equals_single_device_step(runs):
    (state_1, metrics_1), (state_8, metrics_8) = runs["one"], runs["cube"]
    for a, b in zip(metrics_1, metrics_8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    w_in = state_8.params["decoder"]["w_in"]
    assert "fsdp" in str(w_in.sharding.spec) and "tensor" in str(w_in.sharding.spec)
    mu = state_8.opt_state[1][0].mu["decoder"]["w_in"]  # Adam's moment: sharded like w_in
    assert mu.sharding.spec == w_in.sharding.spec
    for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_gradient_accumulation_matches_the_whole_batch(runs):
    _, whole = runs["cube"]
    _, split = run_steps(small_config(grad_accum=2), cube(), fake_batch(1), 2)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
        assert a["tokens"] == b["tokens"]


def test_baseline_step_and_bfloat16_compute():
    config = small_config("tiny-baseline")
    config.model.dtype = "bfloat16"
    batch = fake_batch(3)
    del batch["neighbours"]  # the baseline's batches carry none
    state, metrics = run_steps(config, one_device(), batch, 6, retrieval=False)
    assert "encoder" not in state.params and "cca" not in state.params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert float(metrics[-1]["loss"]) < float(metrics[0]["loss"])


def test_schedule_and_decay_mask():
    train = small_config(steps=100, warmup_steps=10, learning_rate=1e-3).train
    lr = lr_schedule(train)
    assert float(lr(0)) == pytest.approx(1e-7)  # the paper's warmup starts at 1e-7
    assert float(lr(5)) == pytest.approx(5e-4, rel=1e-3)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-4)  # cosine ends at 0.1x the peak
    assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)
    params = {
        "decoder": {"attn_norm": jnp.ones((2, 4)), "w_in": jnp.ones((2, 4, 8))},
        "final_norm": jnp.ones(4),
        "embed": jnp.ones((8, 4)),
        "bias": jnp.ones(4),
        "cca": {  # [C, H] logits
            "attn": {
                "q": jnp.ones((2, 4, 2, 2)),
                "sink": jnp.zeros((2, 2)),
                "match_bias": jnp.zeros((2, 2)),
                "running_bias": jnp.zeros((2, 2)),
            }
        },
    }
    mask = decay_mask(params)
    assert mask == {
        "decoder": {"attn_norm": False, "w_in": True},
        "final_norm": False,
        "embed": True,
        "bias": False,
        # biases, not weights
        "cca": {"attn": {"q": True, "sink": False, "match_bias": False, "running_bias": False}},
    }


def test_retrieval_distractors_give_single_chunks_the_next_sequences_neighbours():
    batch = fake_batch(6, batch=16)
    key = jax.random.key(0)
    assert distract_retrieval(batch, key, 0.0) is batch
    single = {f: v[:1] for f, v in batch.items()}
    assert distract_retrieval(single, key, 1.0) is single  # no other sequence to take from
    neighbours = batch["neighbours"]
    got = np.asarray(distract_retrieval(batch, key, 0.5)["neighbours"])
    own = np.all(got == neighbours, axis=(2, 3))  # [B, chunks]
    other = np.all(got == np.roll(neighbours, -1, axis=0), axis=(2, 3))
    assert np.all(own ^ other)  # each chunk whole: its own neighbours or the next sequence's
    assert 0.3 < other.mean() < 0.7
    assert np.any(other.any(axis=1) & own.any(axis=1))  # chunk by chunk, not whole sequences
    everything = np.asarray(distract_retrieval(batch, key, 1.0)["neighbours"])
    np.testing.assert_array_equal(everything, np.roll(neighbours, -1, axis=0))
    rest = distract_retrieval(batch, key, 0.5)
    assert all(np.array_equal(rest[f], batch[f]) for f in batch if f != "neighbours")


def test_retrieval_dropout_trains_dropped_sequences_exactly_as_retro_off_scores_them():
    batch = fake_batch(5, batch=64)
    assert drop_retrieval(batch, jax.random.key(0), 0.0, 0) is batch
    dropped = drop_retrieval(batch, jax.random.key(0), 0.5, 0)
    off = np.all(np.asarray(dropped["neighbours"]) == 0, axis=(1, 2, 3))
    kept = np.all(np.asarray(dropped["neighbours"]) == batch["neighbours"], axis=(1, 2, 3))
    assert np.all(off ^ kept) and 16 < off.sum() < 48  # whole sequences, about half of them
    assert all(np.array_equal(dropped[f], batch[f]) for f in batch if f != "neighbours")

    # A dropped sequence's loss is its loss with retrieval off; a kept one's is not.
    model = create_model(model_config(small_config()), seed=0)
    with_dropped = model.token_nll(batch["tokens"], dropped["neighbours"], batch["targets"])
    retro_off = model.token_nll(batch["tokens"], None, batch["targets"])
    np.testing.assert_allclose(with_dropped[off], retro_off[off], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(with_dropped - retro_off)[kept]).max() > 1e-3

    # The step draws the distracted chunks, then the dropped sequences, from the state's rng (a
    # resumed run draws the same ones).
    config = small_config()
    tx, schedule = make_optimizer(config.train)
    model_def, state, _ = init_state(model, tx)
    key = jax.random.split(jax.random.wrap_key_data(state.rng))[1]
    distracted = distract_retrieval(batch, jax.random.fold_in(key, 1), 0.3)
    expected, count = token_losses(model, drop_retrieval(distracted, key, 0.5, 0), retrieval=True)
    step = make_train_step(
        model_def, tx, schedule, retrieval=True, retrieval_dropout=0.5, retrieval_distractors=0.3
    )
    _, metrics = step(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(metrics["loss"], expected / count, rtol=1e-5)
