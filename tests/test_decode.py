"""Incremental decoding with caches gives the logits of a full forward pass; Decoders (and
Samplers) of the same config share their compiled steps."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import SMALL as CONFIG

from retro_jax.model import Retro, decode
from retro_jax.model.decode import Decoder
from retro_jax.sample import Sampler

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
    traced = decode.decode_step

    def counting(*args):
        traces.append(1)
        return traced(*args)

    monkeypatch.setattr(decode, "decode_step", counting)
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
    assert len(traces) == 3  # no retriever: caches for k=1, a new shape traced once


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
    compiled = decode._jitted_step._cache_size()
    logits = decode_all(model, tokens, neighbours, 2)
    assert decode._jitted_step._cache_size() == compiled + 2  # with and without neighbours
    full = nnx.jit(lambda m, t, nb: m(t, nb))(model, tokens, neighbours)
    np.testing.assert_allclose(logits, full, atol=1e-4)
