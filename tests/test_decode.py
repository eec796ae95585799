"""Incremental decoding with caches gives the logits of a full forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import SMALL as CONFIG

from retro_jax.model import Retro
from retro_jax.model.decode import Decoder

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
