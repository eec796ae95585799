"""THE record schema: one tf.train.Example per sequence, its writer and its parsers.

Per sequence of n = seq_len tokens, l = n // m chunks, K stored neighbours (all int64 features):

    tokens         [n + 1]        inputs tokens[:n], targets tokens[1:], pad_id after the doc's end
    loss_mask      [n]            1 where target tokens[i+1] is scored (each token scored once)
    target_bytes   [n]            UTF-8 bytes of the text target token i+1 encodes (0 for pad/EOS)
    neighbours     [l * K * 2m]   -> [l, K, 2m]: chunk + continuation per neighbour (pad_id: none)
    neighbour_ids  [l * K]        -> [l, K]: database chunk ids, -1 where missing
    doc_id         [1]            the sequence's document id
    offset         [1]            token offset of tokens[0] inside its document

Examples are serialized by hand (sorted feature names, packed varints) so the bytes are
deterministic and the same with or without TensorFlow; `read_records` / `decode_example` need
only numpy, so training machines without TensorFlow can read the shards. `parse_example` is the
tf.data parser. Writing frames the records here too (CRC32C by google_crc32c), so it needs no
TensorFlow either; the bytes are TFRecordWriter's.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np

from retro_jax.data import files
from retro_jax.errors import RetroError

FEATURES = (
    "doc_id",
    "loss_mask",
    "neighbour_ids",
    "neighbours",
    "offset",
    "target_bytes",
    "tokens",
)
RECORDS_INFO = "records.json"


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """Shapes of one record: n = seq_len, m = chunk_size, K = num_neighbours stored."""

    seq_len: int
    chunk_size: int
    num_neighbours: int

    def __post_init__(self):
        if self.chunk_size <= 0 or self.seq_len <= 0 or self.seq_len % self.chunk_size:
            raise RetroError(
                f"data.seq_len={self.seq_len} must be a positive multiple of "
                f"model.chunk_size={self.chunk_size}"
            )
        if self.num_neighbours < 0:
            raise RetroError(f"data.num_neighbours_stored={self.num_neighbours} must be >= 0")

    @property
    def num_chunks(self) -> int:
        return self.seq_len // self.chunk_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Feature name -> shape after parsing (neighbours [l, K, 2m], neighbour_ids [l, K])."""
        n, m, k, c = self.seq_len, self.chunk_size, self.num_neighbours, self.num_chunks
        return {
            "doc_id": (1,),
            "loss_mask": (n,),
            "neighbour_ids": (c, k),
            "neighbours": (c, k, 2 * m),
            "offset": (1,),
            "target_bytes": (n,),
            "tokens": (n + 1,),
        }

    def flat_lengths(self) -> dict[str, int]:
        return {name: int(np.prod(shape)) for name, shape in self.shapes().items()}

    def check(self, example: dict[str, np.ndarray]) -> None:
        """RetroError unless `example` has exactly this spec's features and sizes."""
        if sorted(example) != sorted(FEATURES):
            raise RetroError(f"record features {sorted(example)} != schema {sorted(FEATURES)}")
        for name, length in self.flat_lengths().items():
            if np.size(example[name]) != length:
                raise RetroError(
                    f"record feature {name!r} has {np.size(example[name])} values, "
                    f"schema {self} wants {length}"
                )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- protobuf, by hand
# Example{1: Features{1: repeated MapEntry{1: key, 2: Feature{3: Int64List{1: packed int64}}}}}


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed_varints(values: np.ndarray) -> bytes:
    """int64 values -> concatenated protobuf varints (negative numbers take 10 bytes)."""
    v = np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view(np.uint64)
    if v.size == 0:
        return b""
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)  # [N, 10]
    # number of 7-bit groups: 1 + index of the highest non-zero group
    nonzero = groups != 0
    lengths = np.where(nonzero.any(axis=1), 10 - np.argmax(nonzero[:, ::-1], axis=1), 1)
    keep = np.arange(10)[None, :] < lengths[:, None]
    more = np.arange(10)[None, :] < (lengths[:, None] - 1)
    groups = groups | (more.astype(np.uint8) << 7)
    return groups[keep].tobytes()


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def encode_example(example: dict[str, np.ndarray]) -> bytes:
    """A tf.train.Example with one Int64List per feature, features in sorted name order."""
    entries = []
    for name in sorted(example):
        int64_list = _length_delimited(1, _packed_varints(np.asarray(example[name])))
        feature = _length_delimited(3, int64_list)
        entry = _length_delimited(1, name.encode()) + _length_delimited(2, feature)
        entries.append(_length_delimited(1, entry))
    return _length_delimited(1, b"".join(entries))


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field, wire type, payload) of a protobuf message; payload is bytes or an int."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            yield field, wire, buf[pos : pos + size]
            pos += size
        elif wire == 1:
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise RetroError(f"corrupt record: protobuf wire type {wire}")


def _unpack_varints(payload: bytes) -> np.ndarray:
    """Concatenated varints -> int64 [N] (vectorised: groups end at bytes below 0x80)."""
    b = np.frombuffer(payload, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    ends = b < 0x80
    group = np.concatenate([[0], np.cumsum(ends[:-1])])  # value index of every byte
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    position = np.arange(b.size) - starts[group]
    parts = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(parts, starts).view(np.int64)


def decode_example(serialized: bytes) -> dict[str, np.ndarray]:
    """A serialized Example of Int64Lists -> {name: int64 [values]} (flat), numpy only."""
    out: dict[str, np.ndarray] = {}
    for field, _, features in _fields(serialized):
        if field != 1:
            continue
        for _, _, entry in _fields(features):
            name, values = None, np.zeros(0, np.int64)
            for efield, _, payload in _fields(entry):
                if efield == 1:
                    name = payload.decode()
                elif efield == 2:
                    values = _int64_list(payload)
            if name is not None:
                out[name] = values
    return out


def _int64_list(feature: bytes) -> np.ndarray:
    chunks = []
    for field, _, payload in _fields(feature):
        if field != 3:
            raise RetroError("record feature is not an Int64List")
        for _, wire, value in _fields(payload):
            # packed (wire 2, what writers emit) or one varint per value (also legal)
            chunks.append(_unpack_varints(value) if wire == 2 else np.array([value], np.uint64))
    if not chunks:
        return np.zeros(0, np.int64)
    return np.concatenate([np.asarray(c).view(np.int64) for c in chunks])


def shape_example(flat: dict[str, np.ndarray], spec: RecordSpec) -> dict[str, np.ndarray]:
    """Flat features -> the schema's shapes (int64)."""
    spec.check(flat)
    return {name: flat[name].reshape(shape) for name, shape in spec.shapes().items()}


# ---------------------------------------------------------------- TFRecord framing

_CRC_TABLE = None

try:  # C (a dependency, 2 ms to import); the table below is its fallback and reference
    from google_crc32c import value as _crc32c_c
except ImportError:
    _crc32c_c = None


def _crc32c(data: bytes) -> int:
    return _crc32c_c(data) if _crc32c_c is not None else _crc32c_table(data)


def _crc32c_table(data: bytes) -> int:
    global _CRC_TABLE
    if _CRC_TABLE is None:
        table = []
        for i in range(256):
            crc = i
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
            table.append(crc)
        _CRC_TABLE = table
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + record
        + struct.pack("<I", masked_crc32c(record))
    )


def write_records(
    path: str, examples: Iterable[dict[str, np.ndarray]], *, spec: RecordSpec | None = None
) -> int:
    """Write examples to the TFRecord file `path` (via path + '.tmp', renamed when complete;
    local or any tf.io.gfile scheme).

    Returns the number of records. With `spec`, every example is checked against it.
    """
    tmp = path + ".tmp"
    count = 0
    files.delete(tmp)  # (left by a killed run; ram:// would append to it)
    # TFRecord framing written here, not by tf.io.TFRecordWriter: the same bytes, without
    # importing TensorFlow (7 s) in every process and Beam worker that writes records.
    with files.open(tmp, "wb") as handle:
        for example in examples:
            if spec is not None:
                spec.check(example)
            handle.write(_frame(encode_example(example)))
            count += 1
    files.replace(tmp, path)
    return count


def iter_serialized(path: str) -> Iterator[bytes]:
    """The raw records of a TFRecord file (length CRC checked; data CRC not, for speed)."""
    with files.open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise RetroError(f"{path}: truncated TFRecord header")
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if masked_crc32c(length_bytes) != length_crc:
                raise RetroError(f"{path}: corrupt TFRecord (length checksum)")
            (length,) = struct.unpack("<Q", length_bytes)
            record = f.read(length)
            if len(record) < length or len(f.read(4)) < 4:
                raise RetroError(f"{path}: truncated TFRecord")
            yield record


def read_records(path: str, spec: RecordSpec | None = None) -> Iterator[dict[str, np.ndarray]]:
    """numpy examples of a TFRecord file; shaped by `spec` ([l, K, 2m] neighbours) if given."""
    for record in iter_serialized(path):
        flat = decode_example(record)
        yield shape_example(flat, spec) if spec is not None else flat


def parse_example(serialized, *, seq_len: int, chunk_size: int, num_neighbours: int):
    """tf.data parser: a scalar (or [B]) string tensor -> dict of int64 tensors in schema shapes."""
    import tensorflow as tf

    spec = RecordSpec(seq_len, chunk_size, num_neighbours)
    features = {
        name: tf.io.FixedLenFeature([length], tf.int64)
        for name, length in spec.flat_lengths().items()
    }
    batched = serialized.shape.rank == 1
    parsed = (tf.io.parse_example if batched else tf.io.parse_single_example)(serialized, features)
    lead = [-1] if batched else []
    return {
        name: tf.reshape(parsed[name], lead + list(shape)) for name, shape in spec.shapes().items()
    }


# ---------------------------------------------------------------- records.json


def write_records_info(prepare_dir: str, info: dict) -> str:
    """W/prepare/records.json: spec, pad_id, vocab_size, counts and file lists (atomic)."""
    path = os.path.join(prepare_dir, RECORDS_INFO)
    files.write_json(path, info, indent=2, sort_keys=True)
    return path


def load_records_info(prepare_dir: str) -> tuple[RecordSpec, dict]:
    """(RecordSpec, the whole records.json) of a prepared workdir's `prepare/` folder (local
    or any tf.io.gfile scheme)."""
    path = os.path.join(prepare_dir, RECORDS_INFO)
    if not files.exists(path):
        raise RetroError(f"{path} not found: run `retro-jax prepare` first")
    info = files.read_json(path)
    spec = RecordSpec(info["seq_len"], info["chunk_size"], info["num_neighbours"])
    return spec, info
