"""Input pipeline: the neighbour shards of `prepare/` -> numpy batches for the train and eval steps.

tf.data (not Grain) because the shards are TFRecords: tf.data reads them natively, checks every
record's CRC, reads gs:// through its own filesystem layer and parses batches of Examples in C++;
Grain's random access would need the shards rewritten as ArrayRecord. TensorFlow is imported only
here, lazily: the model and the train step never need it.

Determinism and resume, without checkpointing tf.data's iterator (whose shuffle buffer would be
saved with every checkpoint): the stream is a sequence of epochs, and epoch e is a pure function
of (seed, e) -- the host's files in a permutation seeded by (seed, e), read interleaved, shuffled
with a buffer seeded by (seed, e), cut to the same number B_e of batches on every host. Global
batch i is batch i mod B_e of epoch i div B_e, so resuming at batch i starts the stream at that
epoch and skips the serialized records before it (before parsing: a read, not a parse). The
position saved in a checkpoint is just i (with the seed and batch size that give it meaning).

Batches (host-local share of the global batch, rows [b]):
    tokens       int32   [b, n]          inputs (record tokens[:n])
    targets      int32   [b, n]          next tokens (record tokens[1:])
    loss_mask    float32 [b, n]
    target_bytes int32   [b, n]
    neighbours   int32   [b, l, k, 2m]   the first k of the K stored (absent when k = 0); with
                                         continuation=False (data.neighbour_continuation) each
                                         neighbour's continuation [..., m:] is pad_id
    doc_id       int32   [b]
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator

import numpy as np

from retro_jax.data import files
from retro_jax.data.records import RecordSpec, load_records_info, parse_example
from retro_jax.errors import RetroError

_SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$")


def _tf():
    import tensorflow as tf  # heavy, and absent on accelerator machines: only the pipeline needs it

    return tf


# ---------------------------------------------------------------- the shards of a split

# (RecordSpec, records.json) of a prepare folder, local or on gs:// (via tf.io.gfile).
load_info = load_records_info


def shard_files(prepare_dir: str, split: str, info: dict | None = None) -> list[str]:
    """Paths of the `split` shards, in order; RetroError naming any missing file.

    The list comes from records.json when it has one (see listed_files), else from the file
    names: NNNNN-of-MMMMM must count 0..MMMMM-1 without gaps.
    """
    names = listed_files(info or {}, split)
    if names is None:
        pattern = os.path.join(prepare_dir, f"{split}-*-of-*.tfrecord")
        found = files.glob(pattern)
        if not found:
            raise RetroError(f"no {split} shards ({pattern}): run `retro-jax prepare` first")
        totals = {int(_SHARD_NAME.match(os.path.basename(p))["total"]) for p in found}
        if len(totals) != 1:
            raise RetroError(f"{prepare_dir}: {split} shards from different runs (totals {totals})")
        total = totals.pop()
        names = [f"{split}-{i:05d}-of-{total:05d}.tfrecord" for i in range(total)]
    paths = [n if "://" in n or os.path.isabs(n) else os.path.join(prepare_dir, n) for n in names]
    for path in paths:
        if not files.exists(path):
            raise RetroError(f"{split} shard missing: {path}")
    if not paths:
        raise RetroError(f"{prepare_dir}/records.json lists no {split} shards")
    return paths


def listed_files(info: dict, split: str) -> list[str] | None:
    """The `split` shard names records.json lists (`splits.<split>.files`, as prepare writes
    it, or `<split>.files` / `files.<split>`), or None when it lists none."""
    for entry in (info.get("splits", {}).get(split), info.get(split)):
        if isinstance(entry, dict) and isinstance(entry.get("files"), list):
            return list(entry["files"])
    files = info.get("files")
    if isinstance(files, dict) and isinstance(files.get(split), list):
        return list(files[split])
    return None


def count_records(path: str) -> int:
    """Records in a TFRecord file, from its length headers alone (seeks past every payload)."""
    tf = _tf()
    count = 0
    with tf.io.gfile.GFile(path, "rb") as f:
        size = f.size()
        position = 0
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                raise RetroError(f"{path}: truncated TFRecord at byte {position}")
            (length,) = struct.unpack("<Q", header[:8])
            position += 12 + length + 4
            if position > size:
                raise RetroError(f"{path}: truncated or corrupt TFRecord (record {count})")
            f.seek(position)
            count += 1
    return count


def find_corrupt_file(paths: list[str]) -> str | None:
    """The first file whose records fail tf.data's CRC checks (tf's errors do not name it)."""
    tf = _tf()
    for path in paths:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.NotFoundError):
            return path
    return None


def host_shards(paths: list[str], process_index: int, process_count: int) -> list[str]:
    """Files read by one host: every process_count-th, starting at its index."""
    if len(paths) < process_count:
        raise RetroError(
            f"{len(paths)} shard files cannot feed {process_count} hosts: write more shards "
            "(data.records_per_shard) or use fewer hosts"
        )
    return paths[process_index::process_count]


def _to_batch(
    parsed: dict, num_neighbours: int, *, continuation: bool = True, pad_id: int = 0
) -> dict:
    """Parsed int64 features [b, ...] -> the model's batch (see the module docstring).

    continuation=False blanks the second half (the continuation F) of every neighbour [N, F]
    with pad_id: the model then reads the neighbour chunks N alone (the paper's ablation)."""
    tf = _tf()
    tokens = tf.cast(parsed["tokens"], tf.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": tf.cast(parsed["loss_mask"], tf.float32),
        "target_bytes": tf.cast(parsed["target_bytes"], tf.int32),
        "doc_id": tf.cast(parsed["doc_id"][:, 0], tf.int32),
    }
    if num_neighbours:
        neighbours = tf.cast(parsed["neighbours"][:, :, :num_neighbours], tf.int32)
        if not continuation:
            m = neighbours.shape[-1] // 2
            neighbours = tf.where(tf.range(2 * m) < m, neighbours, tf.constant(pad_id, tf.int32))
        batch["neighbours"] = neighbours
    return batch


def keep_continuation(config) -> bool:
    """config.data.neighbour_continuation (True when the config predates the key)."""
    return bool(config.data.get("neighbour_continuation", True))


def _options():
    """Deterministic order, and tf.data's autotuner off.

    With the autotuner on, dropping an iterator that fed a training (its end, or the collector
    finding it later) stalls its process, mostly waiting: 3.7-14 s for the demo's baseline after
    30 steps on one core, against 0.0 s with it off, with the same batches and the same 1% of
    the step spent waiting for data. A `retro-jax train` of 30 steps exited 11.0 s after its last
    line with it on and 2.1 s with it off. The AUTOTUNE stages below then run at tf.data's fixed
    defaults instead of tuned ones.
    """
    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    options.experimental_optimization.map_parallelization = True
    return options


class _ShardSet:
    """A split's spec, files, and per-host files and record counts."""

    def __init__(
        self,
        prepare_dir: str,
        split: str,
        num_neighbours: int,
        process_index: int,
        process_count: int,
    ):
        self.spec, self.info = load_info(prepare_dir)
        if not 0 <= num_neighbours <= self.spec.num_neighbours:
            raise RetroError(
                f"train/eval num_neighbours={num_neighbours} but the shards in {prepare_dir} store "
                f"only {self.spec.num_neighbours} (data.num_neighbours_stored)"
            )
        self.pad_id = int(self.info.get("pad_id", 0))
        self.files = shard_files(prepare_dir, split, self.info)
        self.host_files = [host_shards(self.files, p, process_count) for p in range(process_count)]
        self.counts = {path: count_records(path) for path in self.files}
        self.host_records = [sum(self.counts[f] for f in files) for files in self.host_files]
        self.mine = self.host_files[process_index]

    def parse(self, serialized):
        spec: RecordSpec = self.spec
        return parse_example(
            serialized,
            seq_len=spec.seq_len,
            chunk_size=spec.chunk_size,
            num_neighbours=spec.num_neighbours,
        )


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


# ---------------------------------------------------------------- training stream


class TrainBatches:
    """The endless, seeded, resumable stream of this host's training batches (numpy dicts).

    `global_batch` sequences per step in total; this host yields global_batch / process_count.
    `start` is the global batch index to begin at (the `position` saved in a checkpoint).
    continuation=False (data.neighbour_continuation) blanks the neighbours' continuations.
    """

    def __init__(
        self,
        prepare_dir: str,
        *,
        global_batch: int,
        num_neighbours: int,
        seed: int,
        shuffle_buffer: int = 1024,
        start: int = 0,
        continuation: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index, process_count = _process(process_index, process_count)
        if global_batch % process_count:
            raise RetroError(
                f"train.batch_size={global_batch} must divide by the {process_count} hosts"
            )
        self.shards = _ShardSet(prepare_dir, "train", num_neighbours, process_index, process_count)
        self.host_batch = global_batch // process_count
        self.global_batch, self.seed = global_batch, seed
        self.num_neighbours, self.shuffle_buffer = num_neighbours, shuffle_buffer
        self.continuation = continuation
        # Every host must take the same number of steps per epoch, so the smallest share rules.
        self.batches_per_epoch = min(r // self.host_batch for r in self.shards.host_records)
        if self.batches_per_epoch == 0:
            raise RetroError(
                f"{prepare_dir}: {min(self.shards.host_records)} training records on a host, fewer "
                f"than its share {self.host_batch} of train.batch_size={global_batch}"
            )
        self.position = start
        self._iterator: Iterator | None = None

    def state(self) -> dict:
        """What a checkpoint must hold to resume this stream exactly."""
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch}

    def dataset(self, start: int):
        """tf.data of this host's batches from global batch `start` on, epoch after epoch.

        Epoch e is a pure function of (seed, e): files in a permutation seeded by (seed, e), read
        interleaved, shuffled with a buffer seeded by (seed, e), cut to batches_per_epoch batches.
        All epochs are one dataset, so prefetching runs across epoch boundaries.
        """
        tf = _tf()
        first_epoch, offset = divmod(start, self.batches_per_epoch)
        files = tf.constant(self.shards.mine)
        seed = tf.constant(self.seed, tf.int64)
        records_per_epoch = self.batches_per_epoch * self.host_batch
        skip_records = tf.constant(offset * self.host_batch, tf.int64)

        def epoch_records(epoch):
            order = tf.random.experimental.stateless_shuffle(files, seed=tf.stack([seed, epoch]))
            ds = tf.data.Dataset.from_tensor_slices(order).interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(len(self.shards.mine), 8),
                block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            ds = ds.shuffle(
                self.shuffle_buffer, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False
            )
            ds = ds.take(records_per_epoch)  # the same number of batches on every host
            # resuming mid-epoch: skip serialized records (a read, no parsing)
            return ds.skip(tf.where(epoch == first_epoch, skip_records, tf.constant(0, tf.int64)))

        ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_records)
        ds = ds.batch(self.host_batch, drop_remainder=True)  # epochs hold whole batches
        ds = ds.map(
            lambda s: _to_batch(
                self.shards.parse(s),
                self.num_neighbours,
                continuation=self.continuation,
                pad_id=self.shards.pad_id,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        tf = _tf()
        if self._iterator is None:
            self._iterator = self.dataset(self.position).as_numpy_iterator()
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise RetroError(
                "training shards changed while reading: " + ", ".join(self.shards.mine)
            ) from None
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
            bad = find_corrupt_file(self.shards.mine)
            raise RetroError(f"corrupt training shard {bad or '(unknown)'}: {e.message}") from None
        except tf.errors.NotFoundError as e:
            raise RetroError(f"training shard vanished: {e.message}") from None
        self.position += 1
        return batch


# ---------------------------------------------------------------- evaluation pass


class EvalBatches:
    """One pass over the eval shards in file order: every host yields the same number of batches;
    the last ones are padded with rows whose loss_mask is 0 (so every record is scored once).
    continuation=False (data.neighbour_continuation) blanks the neighbours' continuations."""

    def __init__(
        self,
        prepare_dir: str,
        *,
        global_batch: int,
        num_neighbours: int,
        max_batches: int = 0,
        continuation: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index, process_count = _process(process_index, process_count)
        if global_batch % process_count:
            raise RetroError(f"eval.batch_size={global_batch} must divide by {process_count} hosts")
        self.shards = _ShardSet(prepare_dir, "eval", num_neighbours, process_index, process_count)
        self.host_batch = global_batch // process_count
        self.num_neighbours, self.continuation = num_neighbours, continuation
        most = max(self.shards.host_records)
        self.num_batches = -(-most // self.host_batch)
        if max_batches:
            self.num_batches = min(self.num_batches, max_batches)

    def _padding(self, rows: int) -> dict[str, np.ndarray]:
        spec, k = self.shards.spec, self.num_neighbours
        n, pad = spec.seq_len, self.shards.pad_id
        batch = {
            "tokens": np.full((rows, n), pad, np.int32),
            "targets": np.full((rows, n), pad, np.int32),
            "loss_mask": np.zeros((rows, n), np.float32),
            "target_bytes": np.zeros((rows, n), np.int32),
            "doc_id": np.full((rows,), -1, np.int32),
        }
        if k:
            batch["neighbours"] = np.full(
                (rows, spec.num_chunks, k, 2 * spec.chunk_size), pad, np.int32
            )
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        tf = _tf()
        ds = tf.data.TFRecordDataset(self.shards.mine)  # sequential: a fixed order
        ds = ds.batch(self.host_batch).map(
            lambda s: _to_batch(
                self.shards.parse(s),
                self.num_neighbours,
                continuation=self.continuation,
                pad_id=self.shards.pad_id,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        it = ds.prefetch(2).with_options(_options()).as_numpy_iterator()
        for _ in range(self.num_batches):
            try:
                batch = next(it, None)
            except tf.errors.DataLossError as e:
                bad = find_corrupt_file(self.shards.mine)
                raise RetroError(f"corrupt eval shard {bad or '(unknown)'}: {e.message}") from None
            if batch is None:
                batch = self._padding(self.host_batch)
            elif len(batch["tokens"]) < self.host_batch:
                pad = self._padding(self.host_batch - len(batch["tokens"]))
                batch = {name: np.concatenate([batch[name], pad[name]]) for name in batch}
            yield batch
