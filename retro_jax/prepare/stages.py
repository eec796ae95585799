"""The stages `retro-jax prepare` runs: their settings, outputs, builds and commits.

`retro_jax.prepare.run` decides what to (re)build from the manifest; this module knows, per
stage, which config keys it depends on (`settings`), what it leaves in W/prepare (`outputs`),
how to build it into a `<stage>.partial/` folder (`build`, with the builds in
`retro_jax.prepare.builds`) and how to move that into place (`commit`).
The work itself lives in the stage modules (sources, dedup, tokenizer, chunks, sequences,
neighbours); this is the glue that feeds each one the previous stages' outputs.
"""

from __future__ import annotations

import logging
import os

from retro_jax.data import files
from retro_jax.data.records import RECORDS_INFO, RecordSpec
from retro_jax.data.sources import open_source
from retro_jax.errors import RetroError
from retro_jax.prepare.builds import BUILT_WITH, REPORT, StageBuilds

log = logging.getLogger("retro_jax.prepare")

FOLDERS = {
    "tokenizer": "tokenizer",
    "chunks": "db",
    "keys": "keys",
    "index": "index",
    "sequences": "sequences",
}


class StageContext(StageBuilds):
    """What the stages share: the config, W/prepare, and lazily loaded tokenizer / embedder."""

    def __init__(self, config, prepare_dir: str, *, progress: bool = True):
        self.config = config
        self.dir = prepare_dir
        self.progress = progress
        self._tokenizer = None
        self._embedder = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    # ------------------------------------------------------------------ shared inputs

    @property
    def vocab_size(self) -> int:
        """data.vocab_size, 0 meaning the model's vocabulary."""
        return int(self.config.data.vocab_size) or int(self.config.model.vocab_size)

    def bert_folder(self) -> str:
        from retro_jax.retrieval.embed import default_bert_path

        return str(self.config.retrieval.bert_path) or default_bert_path()

    def bert_model_id(self) -> str:
        from retro_jax.retrieval.embed import model_id_of

        folder = self.bert_folder()
        if not files.isfile(os.path.join(folder, "config.json")):
            raise RetroError(f"retrieval.bert_path={folder}: no config.json there")
        return model_id_of(folder)

    def tokenizer(self):
        if self._tokenizer is None:
            from retro_jax.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(
                self.path("tokenizer"), pad_id=int(self.config.model.pad_id)
            )
        return self._tokenizer

    def embedder(self):
        if self._embedder is None:
            from retro_jax.retrieval import ChunkEmbedder
            from retro_jax.retrieval.embed import local_mesh

            r = self.config.retrieval
            self._embedder = ChunkEmbedder.from_pretrained(
                str(r.bert_path) or None,
                max_len=int(r.bert_max_len),
                batch_size=int(r.embed_batch_size),
                mesh=local_mesh(int(r.embed_batch_size)),
                dtype=self.embed_dtype(),
            )
        return self._embedder

    def embed_dtype(self) -> str:
        return str(self.config.retrieval.get("embed_dtype", "float32"))

    def source(self, role: str):
        """The Source of a role (train | eval | retrieval) the config names."""
        return open_source(self.config, role)

    @property
    def filter_retrieval(self) -> bool:
        return bool(self.config.dedup.get("filter_retrieval", True))

    def dropped_ids(self, role: str) -> set[int]:
        """Ids of the documents of a role the leakage filter removes: training documents always,
        retrieval documents unless dedup.filter_retrieval is False, evaluation documents never."""
        from retro_jax.prepare.dedup import read_dropped_ids

        if role == "eval" or (role == "retrieval" and not self.filter_retrieval):
            return set()
        return read_dropped_ids(self.path(REPORT)).get(role, set())

    def documents(self, role: str):
        """Documents of a role, without those the leakage filter drops (`dropped_ids`)."""
        dropped = self.dropped_ids(role)
        return (doc for doc in self.source(role).documents() if doc.doc_id not in dropped)

    def max_chunks(self) -> int:
        """data.retrieval_max_tokens as a number of database chunks (0 = no cap)."""
        tokens = int(self.config.data.get("retrieval_max_tokens", 0))
        if tokens < 0:
            raise RetroError(f"data.retrieval_max_tokens={tokens} must be >= 0 (0 = no cap)")
        return -(-tokens // int(self.config.model.chunk_size))

    def spec(self) -> RecordSpec:
        d = self.config.data
        return RecordSpec(
            int(d.seq_len), int(self.config.model.chunk_size), int(d.num_neighbours_stored)
        )

    # ------------------------------------------------------------------ per stage

    def settings(self, stage: str) -> dict:
        c, d, r = self.config, self.config.data, self.config.retrieval
        if stage == "dedup":
            sources = {role: self.source(role) for role in ("train", "eval", "retrieval")}
            return dict(
                sources={k: [s.spec, s.fingerprint()] for k, s in sources.items()},
                max_docs=int(d.max_docs),
                sotu_eval_docs=int(d.sotu_eval_docs),
                dedup=c.dedup.to_dict(),
            )
        if stage == "tokenizer":
            given = str(d.tokenizer)
            return dict(
                tokenizer=given,
                vocab_size=self.vocab_size,
                pad_id=int(c.model.pad_id),
                sentences=int(d.get("tokenizer_sentences", 200_000)),
                given=_file_digest(given) if given else None,
            )
        if stage == "chunks":
            cap = self.max_chunks()  # (absent when 0: workdirs built before it stay valid)
            return dict(
                chunk_size=int(c.model.chunk_size),
                per_shard=int(d.chunks_per_shard),
                **({"max_chunks": cap} if cap else {}),
                **({} if self.filter_retrieval else {"unfiltered": True}),
            )
        # (the dtype is absent when float32: workdirs built before it stay valid)
        dtype = {"dtype": self.embed_dtype()} if self.embed_dtype() != "float32" else {}
        if stage == "keys":
            return dict(model_id=self.bert_model_id(), max_len=int(r.bert_max_len), **dtype)
        if stage == "index":
            return dict(r.index.to_dict())
        if stage == "sequences":
            return dict(seq_len=int(d.seq_len), per_shard=int(d.records_per_shard))
        return dict(
            spec=self.spec().to_dict(),
            exclude=bool(r.exclude_same_document),
            multiplier=int(r.query_multiplier),
            # (absent when off: workdirs built before the option stay valid)
            **({"align": True} if r.get("align_neighbours", False) else {}),
            **({"rerank": int(r.rerank)} if r.get("rerank", 0) else {}),
            model_id=self.bert_model_id(),
            max_len=int(r.bert_max_len),
            **dtype,  # the queries are embedded like the keys
        )

    def outputs(self, stage: str) -> list[str]:
        if stage == "dedup":
            return [self.path(REPORT)]
        if stage in FOLDERS:
            return [self.path(FOLDERS[stage])]
        listed = []
        if files.exists(self.path(RECORDS_INFO)):
            info = files.read_json(self.path(RECORDS_INFO))
            listed = [self.path(n) for split in info["splits"].values() for n in split["files"]]
        found = files.glob(self.path("train-*-of-*.tfrecord")) + files.glob(
            self.path("eval-*-of-*.tfrecord")
        )
        return [self.path(RECORDS_INFO)] + sorted(set(listed) | set(found))

    def commit(self, stage: str, partial: str) -> None:
        """Move a finished `<stage>.partial/` into place (records.json last)."""
        if stage in FOLDERS:
            files.replace(partial, self.path(FOLDERS[stage]))
            return
        names = sorted(files.listdir(partial))
        last = REPORT if stage == "dedup" else RECORDS_INFO
        for name in [n for n in names if n != last] + [last]:
            files.replace(os.path.join(partial, name), self.path(name))
        files.rmtree(partial)

    def check_foreign_index(self) -> None:
        """An index/ this manifest did not build must match the embedding model and chunk size."""
        folder = self.path("index")
        if not files.isdir(folder):
            return
        from retro_jax.retrieval import NeighbourIndex

        model_id = NeighbourIndex.read_metadata(folder).get("model_id", "")
        chunk_size = None
        if files.exists(os.path.join(folder, BUILT_WITH)):
            chunk_size = files.read_json(os.path.join(folder, BUILT_WITH)).get("chunk_size")
        want_model, want_chunk = self.bert_model_id(), int(self.config.model.chunk_size)
        if model_id != want_model or chunk_size != want_chunk:
            raise RetroError(
                f"{folder} was built with embedding model {model_id!r} and chunk size "
                f"{chunk_size}, but this config uses {want_model!r} (retrieval.bert_path) and "
                f"chunk size {want_chunk} (model.chunk_size): delete it or use another --workdir"
            )

    def build(self, stage: str, partial: str, on_shard) -> dict:
        return getattr(self, "_build_" + stage)(partial, on_shard)

    def report(self, stage: str, summary: dict, run: dict) -> None:
        """The throughput line printed at the end of a stage (work done by this run)."""
        seconds = max(float(run["seconds"]), 1e-9)
        summary = dict(summary, **run)
        count, unit = {
            "dedup": (summary.get("documents", 0), "docs"),
            "tokenizer": (summary.get("documents", 0), "docs"),
            "chunks": (summary.get("num_chunks", 0), "chunks"),
            "keys": (summary.get("embedded", 0), "chunks"),
            "index": (summary.get("keys", 0), "keys"),
            "sequences": (summary.get("documents", 0), "docs"),
            "neighbours": (summary.get("queries", 0), "queries"),
        }[stage]
        print(
            f"prepare {stage}: {count} {unit} in {seconds:.1f} s ({count / seconds:.1f} {unit}/s)",
            flush=True,
        )


def _file_digest(path: str) -> str:
    """sha256 of a file or of a folder's files (a given tokenizer)."""
    import hashlib

    if not files.exists(path):
        raise RetroError(f"data.tokenizer={path}: no such file or folder")
    digest = hashlib.sha256()
    names = (
        [path] if files.isfile(path) else sorted(os.path.join(path, n) for n in files.listdir(path))
    )
    for name in names:
        if files.isfile(name):
            digest.update(files.read_bytes(name))
    return digest.hexdigest()
