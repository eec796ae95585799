"""Causality and masking of RETRO as properties over random inputs and several seeds."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.model import Retro, RetroConfig

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

M = 4  # chunk size
N = 16  # sequence length: 4 chunks
K = 2
CONFIG = RetroConfig(
    vocab_size=64,
    chunk_size=M,
    num_layers=3,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    cca_layers=(2, 3),
    enc_d_model=24,
    enc_num_layers=2,
    enc_num_heads=2,
    enc_head_dim=12,
    enc_d_ff=48,
    cca_zero_init=False,  # drawn CCA outputs, so neighbours reach the logits at init
)


@pytest.fixture(scope="module")
def model():
    return Retro(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    return nnx.jit(lambda model, t, nb: model(t, nb))


def random_inputs(seed, batch=2, n=N, k=K):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (batch, n)).astype(np.int32)
    neighbours = rng.integers(1, CONFIG.vocab_size, (batch, n // M, k, 2 * M)).astype(np.int32)
    return tokens, neighbours


def changed(a, b, tol=1e-6):
    return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1) > tol  # [..., n]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_change_never_reaches_the_past(model, forward, seed):
    tokens, neighbours = random_inputs(seed)
    base = forward(model, tokens, neighbours)
    rng = np.random.default_rng(100 + seed)
    for t in rng.choice(N, size=5, replace=False):
        t = int(t)
        other = tokens.copy()
        other[:, t] = (other[:, t] % (CONFIG.vocab_size - 1)) + 1
        diff = changed(base, forward(model, other, neighbours))
        assert not diff[:, :t].any(), f"changing token {t} changed logits before it"
        assert diff[:, t].all(), f"changing token {t} did not change its own logits"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbours_of_chunk_u_reach_exactly_from_its_last_token(model, forward, seed):
    tokens, neighbours = random_inputs(seed)
    base = forward(model, tokens, neighbours)
    for u in range(N // M):
        other = neighbours.copy()
        other[:, u] = np.random.default_rng(seed * 10 + u).integers(1, 64, other[:, u].shape)
        diff = changed(base, forward(model, tokens, other))
        first = (u + 1) * M - 1
        assert not diff[:, :first].any(), f"neighbours of chunk {u} leaked before {first}"
        assert diff[:, first].all(), f"neighbours of chunk {u} unused at position {first}"


def test_batch_elements_are_independent(model, forward):
    tokens, neighbours = random_inputs(3, batch=4)
    base = forward(model, tokens, neighbours)
    other_t, other_n = tokens.copy(), neighbours.copy()
    other_t[1:] = random_inputs(4, batch=3)[0]
    other_n[1:] = random_inputs(5, batch=3)[1]
    np.testing.assert_allclose(base[0], forward(model, other_t, other_n)[0], atol=1e-6)


def test_fully_padded_neighbours_give_no_cca_and_no_nan(model, forward):
    tokens, neighbours = random_inputs(6)
    padded = neighbours.copy()
    padded[:] = CONFIG.pad_id
    out = forward(model, tokens, padded)
    assert np.isfinite(out).all()
    # With every neighbour padded, CCA contributes exactly zero: same as retrieval off.
    np.testing.assert_array_equal(out, nnx.jit(lambda m, t: m(t))(model, tokens))
    # Padding one chunk's neighbours changes nothing before that chunk's last token.
    one = neighbours.copy()
    one[:, 2] = CONFIG.pad_id
    diff = changed(forward(model, tokens, neighbours), forward(model, tokens, one))
    assert not diff[:, : 3 * M - 1].any() and diff[:, 3 * M - 1].all()


def test_padded_neighbour_tokens_get_zero_gradient(model):
    tokens, neighbours = random_inputs(7)
    neighbours[:, :, :, -3:] = CONFIG.pad_id  # padded tails, as at a document's end
    neighbours[:, 1] = CONFIG.pad_id  # and one chunk with no neighbours at all

    def loss(model):
        return model(jnp.asarray(tokens), jnp.asarray(neighbours)).sum()

    grads = nnx.jit(nnx.grad(loss))(model).encoder.embed[...]  # [vocab, d_enc]
    assert np.all(np.asarray(grads[CONFIG.pad_id]) == 0.0)
    used = np.unique(neighbours[neighbours != CONFIG.pad_id])
    assert np.abs(np.asarray(grads[used])).sum() > 0


def test_trailing_partial_chunk_and_neighbour_count_are_free(model, forward):
    n = N + 3  # a partial fifth chunk: it has no neighbours yet
    tokens, neighbours = random_inputs(8, n=n, k=3)
    out = forward(model, tokens, neighbours)
    assert out.shape == (2, n, CONFIG.vocab_size) and np.isfinite(out).all()
    # Prefix property: the first N positions equal a forward pass over the first N tokens.
    np.testing.assert_allclose(out[:, :N], forward(model, tokens[:, :N], neighbours), atol=1e-5)


def test_trained_retro_copies_its_neighbours_only_where_causality_allows():
    """A learned property: on random tokens, where chunk u's true neighbour is [C_u, C_u+1] (the
    chunk and its continuation, beside a random distractor), a trained RETRO predicts every
    token from the last one of chunk 0 onwards by copying, and none before it: positions
    0..m-2 may not see chunk 0's neighbours (they hold those positions' own futures), so
    their loss must stay at chance, log(V-1). A CCA shifted by m-2 (the known pitfall) lets
    position m-2 copy its label; a shift by m leaves position m-1 at chance; both fail here."""
    from model_configs import TWO_LAYERS, token_nll

    from retro_jax.config import default_config, model_config, model_config_dict
    from retro_jax.model.create import create_model
    from retro_jax.train.state import init_state
    from retro_jax.train.step import make_optimizer, make_train_step

    vocab, m, n, batch = 64, 8, 32, 16
    config = default_config()
    config.model = model_config_dict("tiny", **TWO_LAYERS, vocab_size=vocab, chunk_size=m)
    config.train.update(dict(steps=200, warmup_steps=10, learning_rate=1e-2, batch_size=batch))
    tx, schedule = make_optimizer(config.train)
    model_def, state, _ = init_state(create_model(model_config(config), seed=0), tx)
    step = make_train_step(model_def, tx, schedule, retrieval=True)

    def copy_task(rng, rows):
        tokens = rng.integers(1, vocab, (rows, n + m + 1)).astype(np.int32)
        chunks = tokens[:, : n + m].reshape(rows, n // m + 1, m)
        true = np.concatenate([chunks[:, :-1], chunks[:, 1:]], axis=-1)  # [rows, L, 2m]
        pair = np.stack([true, rng.integers(1, vocab, true.shape).astype(np.int32)], axis=2)
        swap = rng.random((rows, n // m, 1, 1)) < 0.5  # the true neighbour is first or second
        pair = np.where(swap, pair[:, :, ::-1], pair)
        ones = np.ones((rows, n), np.float32)
        return {
            "tokens": tokens[:, :n],
            "targets": tokens[:, 1 : n + 1],
            "neighbours": pair,
            "loss_mask": ones,
        }

    rng = np.random.default_rng(0)
    for _ in range(200):
        state, _ = step(state, copy_task(rng, batch))
    trained = model_def.merge(state.params, state.frozen)
    held_out = copy_task(np.random.default_rng(1), 256)
    nll = np.asarray(
        token_nll(trained, held_out["tokens"], held_out["neighbours"], held_out["targets"])
    ).mean(axis=0)  # [n]
    chance = np.log(vocab - 1)
    assert np.all(np.abs(nll[: m - 1] - chance) < 0.1), nll  # no own future through retrieval
    assert np.all(nll[m - 1 :] < chance - 1.0), nll  # every later position copies
    unretrieved = np.asarray(token_nll(trained, held_out["tokens"], None, held_out["targets"]))
    assert np.all(np.abs(unretrieved.mean(axis=0) - chance) < 0.1)  # the gain is retrieval's


def drawn_option_model(option: str):
    """A model with CCA option `option` on and its learned logits (zero at first) drawn."""
    import dataclasses

    value = M // 2 if option == "cca_running_match" else True  # a window of m/2 tokens
    model = Retro(dataclasses.replace(CONFIG, **{option: value}), rngs=nnx.Rngs(0))
    name = {"cca_sink": "sink", "cca_match_bias": "match_bias"}.get(option, "running_bias")
    p = model.cca["attn"][name]
    p[...] = jnp.asarray(np.random.default_rng(3).normal(size=p.shape), jnp.float32)
    return model


def copying_inputs(seed):
    """random_inputs whose first neighbour of every chunk starts with that chunk and continues
    with the next one, and whose second holds half of it: matches of 1, 1/2 and about 1/63
    (cca_match_bias), and running matches that read the tokens after C_u (cca_running_match)."""
    tokens, neighbours = random_inputs(seed)
    chunks = tokens.reshape(2, N // M, M)
    neighbours[:, :, 0, :M] = chunks
    neighbours[:, :-1, 0, M:] = chunks[:, 1:]
    neighbours[:, :, 1, : M // 2] = chunks[..., : M // 2]
    return tokens, neighbours


@pytest.mark.parametrize("option", ["cca_sink", "cca_match_bias", "cca_running_match"])
def test_cca_options_keep_neighbours_and_tokens_causal(option):
    """With RetroConfig.cca_sink, cca_match_bias or cca_running_match (their logits drawn), the
    neighbours of chunk u still reach exactly the positions from its last token on, and a
    token's change reaches no earlier position (the match bias reads C_u, complete at its last
    token; a running match reads no token after its query)."""
    model = drawn_option_model(option)
    forward = nnx.jit(lambda model, t, nb: model(t, nb))
    tokens, neighbours = copying_inputs(5)
    base = forward(model, tokens, neighbours)
    for u in range(N // M):
        other = neighbours.copy()
        other[:, u] = np.random.default_rng(50 + u).integers(1, 64, other[:, u].shape)
        diff = changed(base, forward(model, tokens, other))
        first = (u + 1) * M - 1
        assert not diff[:, :first].any() and diff[:, first].all(), u
    for t in range(N):
        other = tokens.copy()
        other[:, t] = (other[:, t] % (CONFIG.vocab_size - 1)) + 1
        diff = changed(base, forward(model, other, neighbours))
        assert not diff[:, :t].any() and diff[:, t].all(), t
