"""Incremental decoding with caches gives the logits of a full forward pass, one position per
step or fed in blocks (prefill); Decoders (and Samplers) of the same config share their compiled
steps."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import SMALL as CONFIG

from retro_jax.errors import RetroError
from retro_jax.model import Retro, decode
from retro_jax.model.decode import Decoder
from retro_jax.sample.sampler import Sampler

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

M = 4


def decode_all(model, tokens, neighbours, k):
    decoder = Decoder(model)
    cache = decoder.init_cache(tokens.shape[0], 16, k)
    logits = []
    for t in range(tokens.shape[1]):
        completes = (t + 1) % M == 0
        chunk = neighbours[:, t // M] if (neighbours is not None and completes) else None
        out, cache = decoder.step(cache, tokens[:, t], chunk)
        logits.append(out)
    return jnp.stack(logits, axis=1)


@pytest.mark.parametrize("baseline,retrieve", [(False, True), (False, False), (True, False)])
def test_incremental_logits_equal_full_forward(baseline, retrieve):
    config = CONFIG.baseline() if baseline else CONFIG
    model = Retro(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    n, k = 14, 3  # a trailing partial chunk, and k unlike training's
    tokens = jnp.asarray(rng.integers(1, 64, (2, n)), jnp.int32).at[0, :3].set(0)  # left pad
    neighbours = jnp.asarray(rng.integers(0, 64, (2, n // M, k, 2 * M)), jnp.int32)
    neighbours = neighbours if retrieve else None
    full = nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours)
    np.testing.assert_allclose(decode_all(model, tokens, neighbours, k), full, atol=1e-4)


@pytest.mark.parametrize(
    "layers,cca_layers",
    [(7, (2, 4, 6)), (5, (1, 2, 5))],  # even blocks + a tail layer; consecutive + uneven
)
def test_decoding_loops_equal_full_forward(layers, cca_layers):
    """The decoding step loops over runs of plain layers (and evenly spaced CCA blocks) with the
    caches in the carry: the logits equal the (scanned) full forward pass's."""
    config = dataclasses.replace(CONFIG, num_layers=layers, cca_layers=cca_layers, scan_layers=True)
    model = Retro(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(1, 64, (2, 10)), jnp.int32)
    neighbours = jnp.asarray(rng.integers(0, 64, (2, 10 // M, 2, 2 * M)), jnp.int32)
    full = nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours)
    np.testing.assert_allclose(decode_all(model, tokens, neighbours, 2), full, atol=1e-4)
    for cuts in [(3,), (4, 9)]:  # ... and so do blocks of positions fed at once (prefill)
        logits = feed_in_blocks(model, tokens, neighbours, 2, cuts)
        np.testing.assert_allclose(logits, full, atol=1e-4, err_msg=f"blocks cut at {cuts}")


def feed_in_blocks(model, tokens, neighbours, k, cuts, max_len=32):
    """Feed tokens in the blocks [0, cuts[0]), [cuts[0], cuts[1]), ... with `Decoder.prefill`,
    each block padded on the right to 8 or 16 tokens, and its neighbours (those of the chunks it
    completes) padded to 2 or 4 chunks of pad tokens, as the sampler buckets its prompts (two
    compiled shapes); returns the logits after every position."""
    decoder = Decoder(model)
    cache = decoder.init_cache(tokens.shape[0], max_len, k)
    tokens = np.asarray(tokens)  # blocks made on the host: no eager op compiled per block shape
    bounds = (0, *cuts, tokens.shape[1])
    logits = []
    for a, b in zip(bounds, bounds[1:]):
        width = 8 if b - a <= 8 else 16
        filled = np.zeros((tokens.shape[0], width), np.int32)
        filled[:, : b - a] = tokens[:, a:b]
        block = None
        if neighbours is not None:
            completed = np.asarray(neighbours)[:, a // M : b // M]
            block = np.zeros((tokens.shape[0], width // M, *neighbours.shape[2:]), np.int32)
            block[:, : completed.shape[1]] = completed
        out, cache = decoder.prefill(cache, filled, block, length=b - a, all_logits=True)
        assert int(cache["pos"]) == b
        logits.append(np.asarray(out)[:, : b - a])
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("baseline", [False, True])
def test_prefill_in_any_blocks_equals_full_forward(baseline):
    """Any split of a sequence into blocks fed at once (a prompt, then steps, or blocks starting
    mid-chunk) gives the full forward pass's logits: the blocks' self-attention, chunked
    cross-attention (queries laid out in attending chunks from any offset) and encoding of the
    chunks they complete match the one-pass computation, and the bucket's filler tokens and
    pad neighbours change nothing."""
    model = Retro(CONFIG.baseline() if baseline else CONFIG, rngs=nnx.Rngs(0))
    full_forward = nnx.jit(lambda m, t, nb: m(t, nb))
    n, k = 14, 2
    for seed in range(5):
        rng = np.random.default_rng(seed)
        tokens = jnp.asarray(rng.integers(1, 64, (2, n)), jnp.int32).at[0, : seed + 1].set(0)
        neighbours = jnp.asarray(rng.integers(0, 64, (2, n // M, k, 2 * M)), jnp.int32)
        full = full_forward(model, tokens, neighbours)
        cuts = tuple(sorted(rng.choice(np.arange(1, n), size=rng.integers(1, 4), replace=False)))
        logits = feed_in_blocks(model, tokens, neighbours, k, cuts)
        np.testing.assert_allclose(logits, full, atol=1e-4, err_msg=f"blocks cut at {cuts}")


def test_prefill_past_the_cache_is_refused():
    decoder = Decoder(Retro(CONFIG, rngs=nnx.Rngs(0)))
    cache = decoder.init_cache(1, 8, 2)
    _, cache = decoder.prefill(cache, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(RetroError, match="4 tokens at position 5 overrun the cache's 8"):
        decoder.prefill(cache, jnp.ones((1, 4), jnp.int32))


class _Chars:
    """A tokenizer of single characters: enough for Sampler without a workdir."""

    pad_id, eos_id = 0, 1
    vocab_size = 42  # ids 0..41 (the model's vocabulary may be larger)

    def encode(self, text):
        return np.array([2 + ord(ch) % 40 for ch in text], np.int32)

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_a_second_decoder_on_the_same_config_does_not_retrace(monkeypatch):
    # A config of its own (vocab 48): no other test has compiled its decode step.
    config = dataclasses.replace(CONFIG, vocab_size=48)
    traces = []
    traced = decode.feed

    def counting(*args, **kwargs):
        traces.append(1)
        return traced(*args, **kwargs)

    monkeypatch.setattr(decode, "feed", counting)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 48, (1, 8)), jnp.int32)
    neighbours = jnp.zeros((1, 2, 2, 2 * M), jnp.int32)
    first = decode_all(Retro(config, rngs=nnx.Rngs(0)), tokens, neighbours, 2)
    assert len(traces) == 2  # one step with neighbours, one without
    second = decode_all(Retro(config, rngs=nnx.Rngs(1)), tokens, neighbours, 2)
    assert len(traces) == 2  # new weights, same graph: the compiled steps are reused
    assert not np.allclose(first, second)  # ... and they do read the new weights
    # A Sampler builds its own Decoder: a second Sampler on the same config does not retrace.
    for seed in (2, 3):
        sampler = Sampler(Retro(config, rngs=nnx.Rngs(seed)), _Chars(), None, max_len=16)
        sampler.generate("abc", max_new_tokens=6, temperature=0)
    assert len(traces) == 4  # no retriever (caches for k=1): its prefill and step, traced once


def test_decoding_on_a_mesh_equals_the_full_forward_pass():
    """Weights split over a (2, 2, 2) mesh as in training: the Decoder decodes on that mesh,
    its key/value caches split their heads over `tensor`, and the logits equal the full
    forward pass."""
    from retro_jax.model.create import create_model
    from retro_jax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = create_model(CONFIG, mesh=mesh, seed=0)
    decoder = Decoder(model)
    assert decoder.mesh is mesh
    w_in = nnx.state(model)["decoder"]["w_in"].value
    assert "fsdp" in str(w_in.sharding.spec) and "tensor" in str(w_in.sharding.spec)
    cache = decoder.init_cache(2, 16, 2)
    assert cache["k"].sharding.spec[3] == "tensor" and cache["cca_v"].sharding.spec[4] == "tensor"
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, 64, (2, 10)), jnp.int32)
    neighbours = jnp.asarray(rng.integers(0, 64, (2, 10 // M, 2, 2 * M)), jnp.int32)
    compiled = decode._jitted_feed._cache_size()
    logits = decode_all(model, tokens, neighbours, 2)
    assert decode._jitted_feed._cache_size() == compiled + 2  # with and without neighbours
    full = nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours)
    np.testing.assert_allclose(logits, full, atol=1e-4)


@pytest.mark.parametrize(
    "option, value, name",
    [
        ("cca_sink", True, "sink"),
        ("cca_match_bias", True, "match_bias"),
        ("cca_running_match", 3, "running_bias"),
    ],
)
def test_decoding_with_cca_options_equals_full_forward(option, value, name):
    """RetroConfig.cca_sink / cca_match_bias / cca_running_match: the decoding step's CCA takes
    the same sink logits, and the same neighbour matches (from the fed chunks' tokens and, for a
    running match, the tokens fed up to each query), as the forward pass."""
    model = Retro(dataclasses.replace(CONFIG, **{option: value}), rngs=nnx.Rngs(0))
    p = model.cca["attn"][name]
    p[...] = jnp.asarray(np.random.default_rng(7).normal(size=p.shape), jnp.float32)
    rng = np.random.default_rng(8)
    tokens = rng.integers(1, 64, (2, 12)).astype(np.int32)
    neighbours = rng.integers(0, 64, (2, 12 // M, 2, 2 * M)).astype(np.int32)
    neighbours[:, :, 0, :M] = tokens.reshape(2, 12 // M, M)  # a neighbour that fits: match 1
    neighbours[:, :-1, 0, M : M + 2] = tokens.reshape(2, 12 // M, M)[:, 1:, :2]  # and goes on
    tokens, neighbours = jnp.asarray(tokens), jnp.asarray(neighbours)
    full = nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours)
    np.testing.assert_allclose(decode_all(model, tokens, neighbours, 2), full, atol=1e-4)
    for cuts in [(5,), (3, 8)]:  # and prefilled in blocks that start and end mid-chunk
        logits = feed_in_blocks(model, tokens, neighbours, 2, cuts)
        np.testing.assert_allclose(logits, full, atol=1e-4, err_msg=f"blocks cut at {cuts}")
    p[...] = jnp.zeros(p.shape)  # the option is used: other logits than with it at zero
    assert (
        np.abs(
            np.asarray(nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours) - full)
        ).max()
        > 1e-4
    )
