"""How each `retro-jax prepare` stage is built into its `<stage>.partial/` folder.

`StageBuilds._build_<stage>(partial, on_shard)` feeds one stage module (dedup, tokenizer,
chunks, keys, index, sequences, neighbours) the previous stages' outputs and returns the stage's
counts. The heavy step of each is a method of its own (`dedup_report`, `_build_chunks`,
`embed_keys`, `_build_index`, `cut_sequences`, `find_neighbours`), which the Beam driver
(`retro_jax.prepare.beam.stages`) overrides; the bookkeeping around it is shared.
"""

from __future__ import annotations

import logging
import os

from retro_jax.data import files
from retro_jax.data.records import write_records_info
from retro_jax.errors import RetroError

log = logging.getLogger("retro_jax.prepare")

REPORT = "dedup_report.json"
BUILT_WITH = "built_with.json"  # index/: the embedding model and chunk size of its keys


class StageBuilds:
    """The builds of `StageContext` (a mixin: it uses the context's config, paths and inputs)."""

    def dedup_report(self, sources: dict, eval_source, partial: str) -> dict:
        """The leakage filter's report (the Beam context runs it as a pipeline)."""
        from retro_jax.prepare.dedup import filter_report

        c = self.config.dedup
        report = filter_report(
            eval_source,
            sources,
            threshold=float(c.threshold),
            ngram=int(c.ngram),
            num_perm=int(c.num_perm),
            progress=self.progress,
        )
        report["eval_replaced_utf8"] = eval_source.stats.replaced
        return report

    def _build_dedup(self, partial: str, _hook) -> dict:
        from retro_jax.prepare.dedup import write_report

        sources = {role: self.source(role) for role in ("train", "retrieval")}
        report = self.dedup_report(sources, self.source("eval"), partial)
        write_report(os.path.join(partial, REPORT), report)
        roles = report["roles"]
        for role, counts in roles.items():
            if counts["dropped"]:
                kept = role == "retrieval" and not self.filter_retrieval
                log.warning(
                    "dedup: %s %d of %d %s documents as near-duplicates of "
                    "evaluation documents (see %s)",
                    "found (and kept: dedup.filter_retrieval=False)" if kept else "dropped",
                    counts["dropped"],
                    counts["documents"],
                    role,
                    self.path(REPORT),
                )
        return dict(
            documents=report["eval_documents"] + sum(v["documents"] for v in roles.values()),
            eval_documents=report["eval_documents"],
            **{f"{role}_{k}": v for role, counts in roles.items() for k, v in counts.items()},
        )

    def _build_tokenizer(self, partial: str, _hook) -> dict:
        from retro_jax.data.tokenizer import check_vocab, load_tokenizer, train_sentencepiece

        d, pad_id = self.config.data, int(self.config.model.pad_id)
        documents = 0
        if str(d.tokenizer):
            tokenizer = load_tokenizer(str(d.tokenizer), pad_id=pad_id)
            check_vocab(tokenizer, int(self.config.model.vocab_size))
            tokenizer.save(partial)
        else:
            if self.vocab_size > int(self.config.model.vocab_size):
                raise RetroError(
                    f"data.vocab_size={self.vocab_size} is larger than "
                    f"model.vocab_size={self.config.model.vocab_size}"
                )

            def texts():
                nonlocal documents
                for doc in self.documents("train"):
                    documents += 1
                    yield doc.text

            tokenizer = train_sentencepiece(
                texts(),
                os.path.join(partial, "spm.model"),
                vocab_size=self.vocab_size,
                pad_id=pad_id,
                max_lines=int(d.get("tokenizer_sentences", 200_000)),
                seed=0,  # a fixed sample: the tokenizer depends on the data.* keys alone
            )
            check_vocab(tokenizer, int(self.config.model.vocab_size))
        self._tokenizer = None
        return dict(
            kind=tokenizer.kind,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            documents=documents,
        )

    def _build_chunks(self, partial: str, _hook) -> dict:
        from retro_jax.retrieval.chunks import build_chunk_database

        return build_chunk_database(
            self.documents("retrieval"),
            self.tokenizer(),
            partial,
            chunk_size=int(self.config.model.chunk_size),
            chunks_per_shard=int(self.config.data.chunks_per_shard),
            max_chunks=self.max_chunks(),
            progress=self.progress,
            log=log,
        )

    def embed_keys(self, partial: str, hook) -> dict:
        from retro_jax.retrieval.chunks import ChunkDatabase, write_keys

        return write_keys(
            ChunkDatabase(self.path("db")),
            self.tokenizer(),
            self.embedder(),
            partial,
            progress=self.progress,
            on_shard=hook,
        )

    def _build_keys(self, partial: str, hook) -> dict:
        summary = self.embed_keys(partial, hook)
        info = {k: v for k, v in summary.items() if k != "run"}
        files.write_json(os.path.join(partial, "keys.json"), info, indent=1)
        return summary

    def index_settings(self) -> dict:
        o = self.config.retrieval.index
        return dict(
            brute_force_below=int(o.brute_force_below),
            shard_size=int(o.shard_size),
            num_leaves=int(o.num_leaves),
            leaves_to_search=int(o.leaves_to_search),
            reorder=int(o.reorder),
        )

    def _build_index(self, partial: str, _hook) -> dict:
        from tqdm.auto import tqdm

        from retro_jax.retrieval.chunks import ChunkDatabase, load_keys
        from retro_jax.retrieval.index import build_index_shard, shard_starts, write_metadata

        database = ChunkDatabase(self.path("db"))
        keys = load_keys(self.path("keys"), database)
        info = files.read_json(self.path("keys", "keys.json"))
        settings = self.index_settings()
        numbers = range(len(shard_starts(len(database), settings["shard_size"])))
        shards = [
            build_index_shard(keys, database.per_shard, len(database), number, partial, settings)
            for number in tqdm(
                numbers, desc="index shards", unit="shard", disable=not self.progress
            )
        ]
        write_metadata(partial, info["dim"], info["model_id"], settings, shards)
        summary = dict(keys=len(database), dim=info["dim"], shards=len(shards))
        return self.write_built_with(partial, summary)

    def write_built_with(self, partial: str, summary: dict) -> dict:
        """index/built_with.json: the embedding model and chunk size of the index's keys."""
        from retro_jax.retrieval.chunks import ChunkDatabase

        keys_info = files.read_json(self.path("keys", "keys.json"))
        built_with = dict(
            model_id=keys_info["model_id"],
            chunk_size=ChunkDatabase(self.path("db")).chunk_size,
            keys=summary["keys"],
            dim=keys_info["dim"],
        )
        files.write_json(os.path.join(partial, BUILT_WITH), built_with, indent=1)
        return summary

    def cut_sequences(self, partial: str) -> dict:
        """{split: summary} of the train and eval sequence shards written to `partial`."""
        from retro_jax.data.sequences import write_sequences

        d = self.config.data
        return {
            split: write_sequences(
                self.documents(split),
                self.tokenizer(),
                partial,
                split=split,
                seq_len=int(d.seq_len),
                records_per_shard=int(d.records_per_shard),
                progress=self.progress,
            )
            for split in ("train", "eval")
        }

    def _build_sequences(self, partial: str, _hook) -> dict:
        from retro_jax.data.sequences import write_summary

        summaries = self.cut_sequences(partial)
        write_summary(partial, "sequences.json", summaries)
        return dict(
            documents=sum(s["documents"] for s in summaries.values()),
            **{
                f"{k}_{f}": s[f]
                for k, s in summaries.items()
                for f in ("documents", "tokens", "bytes")
            },
            **{
                f"{k}_sequences": sum(sh["sequences"] for sh in s["shards"])
                for k, s in summaries.items()
            },
        )

    def find_neighbours(self, partial: str, hook, sequences: dict) -> tuple[dict, dict]:
        """Record files of every sequence shard in `partial`: ({split: records.json entry},
        what this run did)."""
        from retro_jax.retrieval import NeighbourIndex
        from retro_jax.retrieval.chunks import ChunkDatabase, load_keys
        from retro_jax.retrieval.neighbours import (
            QUERY_KEYS,
            NeighbourFinder,
            save_query_keys,
            write_neighbour_shards,
        )

        # Every query shard looks up chunks all over the database: remote shards are copied to
        # local disk once rather than read again per query shard.
        database = ChunkDatabase(self.path("db"), local_cache=True)
        spec, r = self.spec(), self.config.retrieval
        finder = NeighbourFinder(
            database,
            load_keys(self.path("keys"), database),
            NeighbourIndex.load(self.path("index")),
            self.embedder(),
            self.tokenizer(),
            num_neighbours=spec.num_neighbours,
            query_multiplier=int(r.query_multiplier),
            exclude_same_document=bool(r.exclude_same_document),
            align=bool(r.get("align_neighbours", False)),
            rerank=int(r.get("rerank", 0)),
        )
        done = set(files.listdir(partial))
        splits, queries_run = {}, 0
        for split in ("train", "eval"):
            # The eval chunks' keys are kept for the eval's database sweep (eval_database.py)
            finder.fresh_keys = {} if split == "eval" else None
            splits[split] = write_neighbour_shards(
                finder,
                split,
                self.path("sequences"),
                sequences[split],
                partial,
                spec,
                done=done,
                progress=self.progress,
                on_shard=hook,
            )
            queries_run += splits[split].pop("run")["queries"]
        if finder.fresh_keys:  # (none when the eval shards were written by an interrupted run)
            save_query_keys(os.path.join(partial, QUERY_KEYS), finder.fresh_keys, self.embedder())
        run = dict(
            queries=queries_run,
            embedded=finder.embedded,
            reused_keys=finder.reused,
            missing_neighbours=finder.missing,
        )
        return splits, run

    def _build_neighbours(self, partial: str, hook) -> dict:
        from retro_jax.retrieval import NeighbourIndex
        from retro_jax.retrieval.chunks import ChunkDatabase

        database = ChunkDatabase(self.path("db"))
        index = NeighbourIndex.read_metadata(self.path("index"))
        model_id, tokenizer, spec = self.bert_model_id(), self.tokenizer(), self.spec()
        if index["model_id"] != model_id or index["count"] != len(database):
            raise RetroError(
                f"{self.path('index')} ({index['model_id']}, {index['count']} keys) does not "
                f"match the embedder {model_id} and database ({len(database)} chunks)"
            )
        sequences = files.read_json(self.path("sequences", "sequences.json"))
        splits, run = self.find_neighbours(partial, hook, sequences)
        for split in splits:
            splits[split]["documents"] = sequences[split]["documents"]
        info = dict(
            spec.to_dict(),
            pad_id=tokenizer.pad_id,
            eos_id=tokenizer.eos_id,
            vocab_size=tokenizer.vocab_size,
            tokenizer="tokenizer",
            model_id=model_id,
            database_chunks=len(database),
            splits=splits,
        )
        write_records_info(partial, info)
        return dict(
            queries=sum(s["queries"] for s in splits.values()),
            **{f"{k}_records": s["records"] for k, s in splits.items()},
            run=run,
        )
