"""The input pipeline: seeded, resumable, split across hosts; eval pass; bad shards named."""

import os

import numpy as np
import pytest

from retro_jax.data import records
from retro_jax.data.pipeline import EvalBatches, TrainBatches
from retro_jax.errors import RetroError


def write_fake_prepare(
    workdir,
    *,
    seq_len=32,
    chunk_size=8,
    num_neighbours=4,
    vocab_size=64,
    train_files=4,
    records_per_file=16,
    eval_files=2,
    eval_records_per_file=6,
    pad_id=0,
    seed=0,
    listed=True,
) -> str:
    """W/prepare/ with shards in the record schema: learnable token patterns (arithmetic
    progressions mod vocab), neighbours that continue them. records.json lists the files as
    `prepare` does (`splits.<split>.files`) unless listed=False. Returns the prepare folder."""
    prepare = os.path.join(str(workdir), "prepare")
    os.makedirs(prepare, exist_ok=True)
    spec = records.RecordSpec(seq_len, chunk_size, num_neighbours)
    rng = np.random.default_rng(seed)
    n, m, chunks = seq_len, chunk_size, seq_len // chunk_size
    doc, splits = 0, {}
    for split, files, per_file in (
        ("train", train_files, records_per_file),
        ("eval", eval_files, eval_records_per_file),
    ):
        for f in range(files):
            examples = []
            for _ in range(per_file):
                start, stride = rng.integers(1, vocab_size), rng.integers(1, 4)
                tokens = (start + stride * np.arange(n + 1 + 2 * m)) % (vocab_size - 1) + 1
                neighbours = np.stack(
                    [
                        np.stack(
                            [tokens[u * m + j : u * m + j + 2 * m] for j in range(num_neighbours)]
                        )
                        for u in range(chunks)
                    ]
                )  # [l, K, 2m]
                mask = np.ones(n, np.int64)
                mask[n - int(rng.integers(0, 3)) :] = 0  # some sequences end in padding
                examples.append(
                    {
                        "tokens": tokens[: n + 1],
                        "loss_mask": mask,
                        "target_bytes": rng.integers(1, 5, n) * mask,
                        "neighbours": neighbours.reshape(-1),
                        "neighbour_ids": np.arange(chunks * num_neighbours),
                        "doc_id": np.array([doc]),
                        "offset": np.array([0]),
                    }
                )
                doc += 1
            name = f"{split}-{f:05d}-of-{files:05d}.tfrecord"
            records.write_records(os.path.join(prepare, name), examples, spec=spec)
            splits.setdefault(split, {"files": [], "records": 0})["files"].append(name)
            splits[split]["records"] += per_file
    info = {**spec.to_dict(), "pad_id": pad_id, "vocab_size": vocab_size}
    records.write_records_info(prepare, {**info, "splits": splits} if listed else info)
    return prepare


@pytest.fixture(scope="module")
def prepare_dir(tmp_path_factory):
    return write_fake_prepare(tmp_path_factory.mktemp("pipeline"))


def take(it, count):
    return [next(it) for _ in range(count)]


def test_batches_are_a_function_of_seed_and_position(prepare_dir):
    make = lambda **kw: TrainBatches(  # noqa: E731
        prepare_dir,
        global_batch=8,
        num_neighbours=2,
        seed=kw.pop("seed", 3),
        shuffle_buffer=16,
        process_index=0,
        process_count=1,
        **kw,
    )
    stream = make()
    assert stream.batches_per_epoch == 8
    first = take(stream, 12)  # crosses into the second epoch
    again = take(make(), 12)
    resumed = take(make(start=6), 6)  # resume mid-epoch, continue past the epoch boundary
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[6:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = take(make(seed=4), 8)
    assert not all(np.array_equal(a["doc_id"], b["doc_id"]) for a, b in zip(first, other))
    # each epoch sees every record once, in a different order from the last
    epoch0 = np.concatenate([b["doc_id"] for b in first[:8]])
    assert sorted(epoch0) == list(range(64))
    assert not np.array_equal(epoch0[:4], np.concatenate([b["doc_id"] for b in first[8:]])[:4])


def test_training_stream_runs_without_tf_data_autotuning(prepare_dir):
    """Autotuning off (pipeline._options): with it on, dropping a used iterator stalls seconds."""
    stream = TrainBatches(
        prepare_dir, global_batch=8, num_neighbours=2, seed=3, process_index=0, process_count=1
    )
    options = stream.dataset(0).options()
    assert options.autotune.enabled is False
    assert options.deterministic is True


def test_batch_fields_match_the_records(prepare_dir):
    spec, _ = records.load_records_info(prepare_dir)
    stored = {}
    for f in sorted(os.listdir(prepare_dir)):
        if f.startswith("train"):
            for ex in records.read_records(os.path.join(prepare_dir, f), spec):
                stored[int(ex["doc_id"][0])] = ex
    batch = next(
        TrainBatches(
            prepare_dir, global_batch=8, num_neighbours=2, seed=0, process_index=0, process_count=1
        )
    )
    assert batch["tokens"].shape == (8, 32) and batch["tokens"].dtype == np.int32
    assert batch["neighbours"].shape == (8, 4, 2, 16) and batch["neighbours"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    for row, doc in enumerate(batch["doc_id"]):
        ex = stored[int(doc)]
        np.testing.assert_array_equal(batch["tokens"][row], ex["tokens"][:-1])
        np.testing.assert_array_equal(batch["targets"][row], ex["tokens"][1:])
        np.testing.assert_array_equal(batch["neighbours"][row], ex["neighbours"][:, :2])
        np.testing.assert_array_equal(batch["loss_mask"][row], ex["loss_mask"])
        np.testing.assert_array_equal(batch["target_bytes"][row], ex["target_bytes"])
    baseline = next(
        TrainBatches(
            prepare_dir, global_batch=8, num_neighbours=0, seed=0, process_index=0, process_count=1
        )
    )
    assert "neighbours" not in baseline


def test_hosts_read_disjoint_files(prepare_dir):
    hosts = [
        TrainBatches(
            prepare_dir, global_batch=8, num_neighbours=1, seed=0, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    assert [h.host_batch for h in hosts] == [4, 4]
    assert hosts[0].shards.mine == hosts[0].shards.files[0::2]
    seen = [np.concatenate([b["doc_id"] for b in take(h, h.batches_per_epoch)]) for h in hosts]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(64))


def test_eval_is_one_fixed_pass_with_padding(prepare_dir):
    passes = [
        list(
            EvalBatches(
                prepare_dir, global_batch=8, num_neighbours=2, process_index=0, process_count=1
            )
        )
        for _ in range(2)
    ]
    first, second = passes
    assert len(first) == 2  # 12 records in batches of 8
    docs = np.concatenate([b["doc_id"] for b in first])
    np.testing.assert_array_equal(docs[:12], np.arange(64, 76))  # file order, then padding
    assert (docs[12:] == -1).all() and (first[1]["loss_mask"][4:] == 0).all()
    for a, b in zip(first, second):
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("listed", [True, False])
def test_missing_shard_is_named(tmp_path, listed):
    prepare = write_fake_prepare(tmp_path, train_files=3, records_per_file=8, listed=listed)
    os.remove(os.path.join(prepare, "train-00001-of-00003.tfrecord"))
    with pytest.raises(RetroError, match="train-00001-of-00003.tfrecord"):
        TrainBatches(
            prepare, global_batch=8, num_neighbours=2, seed=0, process_index=0, process_count=1
        )


def test_corrupt_shard_is_named(tmp_path):
    prepare = write_fake_prepare(tmp_path, train_files=2, records_per_file=8)
    path = os.path.join(prepare, "train-00001-of-00002.tfrecord")
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF  # inside the first record's payload: its CRC no longer matches
    open(path, "wb").write(bytes(data))
    stream = TrainBatches(
        prepare, global_batch=4, num_neighbours=2, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(RetroError, match="corrupt training shard .*train-00001-of-00002"):
        take(stream, stream.batches_per_epoch)


def test_without_continuation_the_neighbours_second_half_is_padding(tmp_path):
    pad = 63  # not 0, so the test sees which id fills the continuation
    prepare = write_fake_prepare(tmp_path, vocab_size=63, pad_id=pad)  # tokens in 1..62
    m = 8
    common = dict(num_neighbours=2, process_index=0, process_count=1)
    train = lambda c: next(  # noqa: E731
        TrainBatches(prepare, global_batch=8, seed=0, continuation=c, **common)
    )
    evals = lambda c: list(EvalBatches(prepare, global_batch=8, continuation=c, **common))  # noqa: E731
    for full, cut in [(train(True), train(False)), *zip(evals(True), evals(False))]:
        assert set(full) == set(cut)
        for key in full:
            if key != "neighbours":
                np.testing.assert_array_equal(full[key], cut[key])
        real = full["doc_id"] >= 0  # eval padding rows are all pad_id anyway
        assert (full["neighbours"][real][..., m:] != pad).all()  # the records do continue
        assert (cut["neighbours"][..., m:] == pad).all()
        np.testing.assert_array_equal(cut["neighbours"][..., :m], full["neighbours"][..., :m])


def test_train_and_eval_read_data_neighbour_continuation(tmp_path, monkeypatch):
    """train passes data.neighbour_continuation to its training and evaluation batches."""
    from test_train_step import small_config

    from retro_jax.data import pipeline
    from retro_jax.train.loop import train

    write_fake_prepare(tmp_path, train_files=1, records_per_file=8)
    seen = {}

    class Stop(Exception):
        pass

    def recording(cls):
        def make(*args, **kwargs):
            seen[cls.__name__] = kwargs.get("continuation", True)
            if cls is EvalBatches:
                raise Stop
            return cls(*args, **kwargs)

        return make

    monkeypatch.setattr(pipeline, "TrainBatches", recording(TrainBatches))
    monkeypatch.setattr(pipeline, "EvalBatches", recording(EvalBatches))
    config = small_config(eval_every=5)
    assert config.data.neighbour_continuation is True  # the default
    config.data.neighbour_continuation = False
    with pytest.raises(Stop):
        train(config, str(tmp_path))
    assert seen == {"TrainBatches": False, "EvalBatches": False}
