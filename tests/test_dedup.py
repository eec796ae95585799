"""Leakage filter: planted near-duplicates are found, distinct texts are kept, the report names
each dropped document's evaluation twin."""

import json

import numpy as np

from retro_jax.data.sources import Source
from retro_jax.prepare.dedup import (
    exact_jaccard,
    filter_report,
    near_duplicates,
    read_dropped_ids,
    shingles,
    write_report,
)


def _text(rng, words=300):
    vocab = [f"w{i}" for i in range(5000)]
    return " ".join(rng.choice(vocab, words))


def _edit(text, rng, fraction):
    """Replace about `fraction` of the words at one contiguous place (keeps most 13-grams)."""
    words = text.split()
    cut = int(len(words) * fraction)
    start = int(rng.integers(0, len(words) - cut))
    words[start : start + cut] = ["changed"] * cut
    return " ".join(words)


def test_shingles():
    assert shingles("A b c", 13) == [b"a b c"]  # shorter than 13 words: one shingle
    words = " ".join(str(i) for i in range(15))
    assert len(shingles(words, 13)) == 3
    assert shingles("X  y\nZ", 2) == [b"x y", b"y z"]


def test_planted_near_duplicates_are_found():
    rng = np.random.default_rng(0)
    evals = [_text(rng) for _ in range(5)]
    train = [_text(rng) for _ in range(30)]
    planted = {3: _edit(evals[1], rng, 0.01), 17: evals[4], 25: _edit(evals[0], rng, 0.02)}
    for i, text in planted.items():
        train[i] = text
    far = _edit(evals[2], rng, 0.5)  # about a third of the 13-grams survive: kept
    train[10] = far
    assert exact_jaccard(far, evals[2]) < 0.5
    assert exact_jaccard(planted[25], evals[0]) > 0.8
    assert near_duplicates(train, evals) == [3, 17, 25]
    # Short documents compare as one shingle: identical short texts are duplicates.
    assert near_duplicates(["a short note", "another one"], ["A  short note"]) == [0]


def test_report_names_twins_and_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "eval").mkdir()
    (tmp_path / "train").mkdir()
    evals = [_text(rng) for _ in range(3)]
    for i, text in enumerate(evals):
        (tmp_path / "eval" / f"e{i}.txt").write_text(text)
    for i in range(6):
        (tmp_path / "train" / f"t{i}.txt").write_text(evals[2] if i == 4 else _text(rng))
    train_glob = str(tmp_path / "train" / "*.txt")
    report = filter_report(
        Source(str(tmp_path / "eval" / "*.txt"), "eval", setting="data.eval_source"),
        {
            "train": Source(train_glob, "train", setting="data.train_source"),
            "retrieval": Source(train_glob, "retrieval", setting="data.train_source"),
        },
        progress=False,
    )
    assert report["eval_documents"] == 3
    assert report["roles"]["train"] == report["roles"]["retrieval"]
    assert report["roles"]["train"]["documents"] == 6 and report["roles"]["train"]["dropped"] == 1
    (entry,) = [e for e in report["dropped"] if e["role"] == "train"]
    assert entry["key"].endswith("t4.txt") and entry["eval_key"].endswith("e2.txt")
    assert entry["similarity"] == 1.0
    path = str(tmp_path / "report.json")
    write_report(path, report)
    assert json.load(open(path))["dropped"][0]["doc_id"] == entry["doc_id"]
    dropped = read_dropped_ids(path)
    assert dropped["train"] == dropped["retrieval"] == {entry["doc_id"]}
