"""The record schema: hand-written protobuf agrees with TensorFlow's, both ways, and round-trips."""

import numpy as np
import pytest

from retro_jax.data import records
from retro_jax.errors import RetroError

SPEC = records.RecordSpec(seq_len=32, chunk_size=8, num_neighbours=3)


def _example(rng, spec=SPEC):
    n, c, k, m = spec.seq_len, spec.num_chunks, spec.num_neighbours, spec.chunk_size
    return {
        "tokens": rng.integers(0, 2**40, n + 1),
        "loss_mask": rng.integers(0, 2, n),
        "target_bytes": rng.integers(0, 9, n),
        "neighbours": rng.integers(0, 500, c * k * 2 * m),
        "neighbour_ids": np.where(rng.random(c * k) < 0.3, -1, rng.integers(0, 10**12, c * k)),
        "doc_id": np.array([2**62 + 5]),
        "offset": np.array([17]),
    }


def test_spec_shapes_and_validation():
    shapes = SPEC.shapes()
    assert shapes["neighbours"] == (4, 3, 16) and shapes["neighbour_ids"] == (4, 3)
    assert shapes["tokens"] == (33,) and shapes["loss_mask"] == (32,)
    with pytest.raises(RetroError, match="seq_len"):
        records.RecordSpec(seq_len=30, chunk_size=8, num_neighbours=2)
    bad = _example(np.random.default_rng(0))
    bad["tokens"] = bad["tokens"][:-1]
    with pytest.raises(RetroError, match="tokens"):
        SPEC.check(bad)


def test_encoding_matches_tensorflow_both_ways():
    tf = pytest.importorskip("tensorflow")
    example = _example(np.random.default_rng(1))
    ours = records.encode_example(example)
    parsed = tf.train.Example.FromString(ours)
    for name, values in example.items():
        assert list(parsed.features.feature[name].int64_list.value) == list(values), name
    theirs = records.decode_example(parsed.SerializeToString())
    for name, values in example.items():
        np.testing.assert_array_equal(theirs[name], values)


def test_write_read_roundtrip_and_pure_python_framing(tmp_path):
    rng = np.random.default_rng(2)
    examples = [_example(rng) for _ in range(5)]
    path = str(tmp_path / "train-00000-of-00001.tfrecord")
    assert records.write_records(path, examples, spec=SPEC) == 5
    assert not (tmp_path / "train-00000-of-00001.tfrecord.tmp").exists()
    back = list(records.read_records(path, SPEC))
    assert len(back) == 5
    for a, b in zip(examples, back, strict=True):
        np.testing.assert_array_equal(b["neighbours"], a["neighbours"].reshape(4, 3, 16))
        np.testing.assert_array_equal(b["neighbour_ids"], a["neighbour_ids"].reshape(4, 3))
        np.testing.assert_array_equal(b["tokens"], a["tokens"])


def test_framing_is_tensorflows_byte_for_byte(tmp_path):
    """write_records frames records itself (no TensorFlow import): TensorFlow's TFRecordWriter
    writes the same bytes, and the CRC32C table (the fallback without google_crc32c) agrees."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    examples = [_example(rng) for _ in range(5)]
    ours, theirs = str(tmp_path / "ours.tfrecord"), str(tmp_path / "theirs.tfrecord")
    records.write_records(ours, examples)
    with tf.io.TFRecordWriter(theirs) as writer:
        for example in examples:
            writer.write(records.encode_example(example))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    assert records._crc32c(b"123456789") == records._crc32c_table(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert records._crc32c(data) == records._crc32c_table(data)


def test_tf_data_parser(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    examples = [_example(rng) for _ in range(4)]
    path = str(tmp_path / "x.tfrecord")
    records.write_records(path, examples)
    kwargs = dict(seq_len=32, chunk_size=8, num_neighbours=3)
    single = next(
        iter(tf.data.TFRecordDataset(path).map(lambda s: records.parse_example(s, **kwargs)))
    )
    np.testing.assert_array_equal(
        single["neighbours"].numpy(), examples[0]["neighbours"].reshape(4, 3, 16)
    )
    batched = next(
        iter(
            tf.data.TFRecordDataset(path).batch(4).map(lambda s: records.parse_example(s, **kwargs))
        )
    )
    assert batched["neighbours"].shape == (4, 4, 3, 16)
    np.testing.assert_array_equal(batched["doc_id"].numpy()[:, 0], [2**62 + 5] * 4)


def test_corrupt_file_is_reported(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    records.write_records(path, [_example(np.random.default_rng(4))])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-30])
    with pytest.raises(RetroError, match="truncated"):
        list(records.read_records(path))


def test_records_info_roundtrip(tmp_path):
    with pytest.raises(RetroError, match="prepare"):
        records.load_records_info(str(tmp_path))
    records.write_records_info(str(tmp_path), {**SPEC.to_dict(), "pad_id": 0})
    spec, info = records.load_records_info(str(tmp_path))
    assert spec == SPEC and info["pad_id"] == 0
