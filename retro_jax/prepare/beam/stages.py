"""`retro-jax prepare --runner=...`: the stages as Beam pipelines, one pipeline per stage.

`BeamStageContext` is the local `StageContext` with the heavy work of six stages replaced by
pipelines over the same per-document and per-shard functions; the driver (`run_prepare`), the
manifest, the `<stage>.partial/` folders and their commits are shared, so a stage can be built
by either driver and the outputs are the same. The tokenizer is trained on the driver (one
SentencePiece model over a sample of sentences is not worth distributing).

Resuming: `keys` and `neighbours` keep the shards an interrupted run finished, as locally.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import re

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from retro_jax.data import files
from retro_jax.data.sources import open_source
from retro_jax.errors import RetroError
from retro_jax.prepare.beam.documents import read_documents
from retro_jax.prepare.stages import StageContext

log = logging.getLogger("retro_jax.prepare")


def pipeline_options(runner: str, args: list[str]) -> PipelineOptions:
    """Beam options from `--runner` and the remaining command-line flags (e.g.
    `--direct_num_workers=2 --direct_running_mode=multi_processing`, or Dataflow's `--project`,
    `--region`, `--temp_location`, `--sdk_container_image`).

    Checked here, before any work: the runner must exist, every value must parse and every option
    must be known to Beam once the runner's module is imported (Beam itself drops a misspelled
    option with a log line). A portable runner (Flink, Spark, Prism, PortableRunner) learns more
    options from its job server when the pipeline runs, so unknown options are passed on to it."""
    from apache_beam.runners import create_runner
    from apache_beam.runners.portability.portable_runner import PortableRunner

    # The portable runners log every worker's start-up at WARNING.
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    try:
        created = create_runner(runner)  # imports the runner's module and its options
    except ValueError as e:  # not a runner name nor a dotted class name
        known = ", ".join(beam.options.pipeline_options.StandardOptions.KNOWN_RUNNER_NAMES)
        raise RetroError(
            f"prepare: unknown Beam runner --runner={runner}; known runners: {known}, or a "
            "PipelineRunner subclass as package.module.Class"
        ) from e
    except Exception as e:  # ImportError (e.g. Dataflow without apache-beam[gcp]), ...
        first = str(e).strip().splitlines()[:1] or [""]
        raise RetroError(
            f"prepare: Beam runner --runner={runner} cannot be created "
            f"({e.__class__.__name__}: {first[0]})"
        ) from e
    bad = [a for a in args if a.split("=", 1)[0] in ("-h", "--help")]
    if bad:  # Beam's parser would print its own help and exit
        raise RetroError(f"prepare: {bad[0]} is not a Beam pipeline option")
    options = PipelineOptions([f"--runner={runner}", *args])
    parsers = []  # Beam's parser of every known option, handed to us by this hook
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # argparse prints its usage (200 lines)
            known = options.get_all_options(add_extra_args_fn=parsers.append)
    except SystemExit as e:  # a value that does not parse: `--direct_num_workers=abc`
        message = (errors.getvalue().strip().splitlines() or ["a value does not parse"])[-1]
        raise RetroError(
            f"prepare: Beam pipeline options: {message.split('error: ', 1)[-1]}"
        ) from e
    _, unknown = parsers[0].parse_known_args([f"--runner={runner}", *args])
    unknown = [a for a in unknown if a.startswith("-")] or unknown
    if unknown and not isinstance(created, PortableRunner):
        name = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, [f"--{k}" for k in known], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise RetroError(
            f"prepare: unknown Beam pipeline option {name} for --runner={runner}{hint} "
            "(flags that retro-jax does not define are Beam pipeline options)"
        )
    options.view_as(beam.options.pipeline_options.SetupOptions).save_main_session = False
    return options


def _retro_error(error: Exception) -> RetroError | None:
    """A RetroError raised on a worker: re-raised by the runner (in process, with Beam's
    "[while running STEP]" appended) or as text inside the runner's own error."""
    if isinstance(error, RetroError):
        message = str(error)
    else:
        found = re.search(r"RetroError: (.+)", str(error))
        if not found:
            return None
        message = found.group(1)
    return RetroError(re.sub(r"\s*\[while running .*\]$", "", message.strip()))


class BeamStageContext(StageContext):
    def __init__(self, config, prepare_dir: str, options: PipelineOptions, *, progress=True):
        super().__init__(config, prepare_dir, progress=progress)
        self.options = options

    def build(self, stage: str, partial: str, on_shard) -> dict:
        try:
            return super().build(stage, partial, on_shard)
        except Exception as e:  # a worker's error, as the runner passes it on
            error = _retro_error(e)
            if error is None:
                raise
            raise error from e

    def source(self, role: str):
        source = open_source(self.config, role)
        source.beam_options = self.options  # a Beam-built TFDS dataset runs on this runner
        return source

    def documents_of(self, pipeline, role: str):
        """(ordinal, Document) of a role, without the documents the leakage filter dropped."""
        docs, stats = read_documents(pipeline, self.source(role), role)
        dropped = self.dropped_ids(role)
        if dropped:
            docs = docs | f"{role}: leakage filter" >> beam.Filter(
                lambda od, dropped=frozenset(dropped): od[1].doc_id not in dropped
            )
        return docs, stats

    def dedup_report(self, sources: dict, eval_source, partial: str) -> dict:
        from retro_jax.prepare.beam.dedup import build_dedup

        work = os.path.join(partial, "_beam")
        files.makedirs(work)
        report = build_dedup(self.options, self.config, sources, eval_source, work)
        files.rmtree(work)
        return report

    def _build_chunks(self, partial: str, _hook) -> dict:
        from retro_jax.prepare.beam.database import build_chunks

        return build_chunks(
            self.options,
            self.documents_of,
            self.tokenizer(),
            self.path("tokenizer"),
            partial,
            chunk_size=int(self.config.model.chunk_size),
            per_shard=int(self.config.data.chunks_per_shard),
            max_chunks=self.max_chunks(),
            log=log,
        )

    def _bert(self) -> dict:
        r = self.config.retrieval
        return dict(
            path=str(r.bert_path),
            max_len=int(r.bert_max_len),
            batch_size=int(r.embed_batch_size),
            model_id=self.bert_model_id(),
            dtype=self.embed_dtype(),
        )

    def embed_keys(self, partial: str, hook) -> dict:
        from retro_jax.prepare.beam.database import build_keys

        pad_id = int(self.config.model.pad_id)
        return build_keys(self.options, self.dir, partial, pad_id=pad_id, bert=self._bert())

    def _build_index(self, partial: str, _hook) -> dict:
        from retro_jax.prepare.beam.database import build_index

        settings = self.index_settings()
        summary = build_index(self.options, self.dir, partial, settings, self.bert_model_id())
        return self.write_built_with(partial, summary)

    def cut_sequences(self, partial: str) -> dict:
        from retro_jax.prepare.beam.neighbours import build_sequences

        d = self.config.data
        return build_sequences(
            self.options,
            self.documents_of,
            self.path("tokenizer"),
            int(self.config.model.pad_id),
            partial,
            seq_len=int(d.seq_len),
            per_shard=int(d.records_per_shard),
        )

    def find_neighbours(self, partial: str, hook, sequences: dict) -> tuple[dict, dict]:
        from retro_jax.prepare.beam.neighbours import build_neighbours
        from retro_jax.retrieval.neighbours import split_summary

        r, spec = self.config.retrieval, self.spec()
        bert = self._bert()
        settings = dict(
            bert_path=bert["path"],
            max_len=bert["max_len"],
            batch_size=bert["batch_size"],
            dtype=bert["dtype"],
            pad_id=int(self.config.model.pad_id),
            k=spec.num_neighbours,
            multiplier=int(r.query_multiplier),
            exclude=bool(r.exclude_same_document),
            align=bool(r.get("align_neighbours", False)),
            rerank=int(r.get("rerank", 0)),
        )
        run = build_neighbours(self.options, self.dir, partial, sequences, spec, settings)
        splits = {split: split_summary(split, sequences[split], spec) for split in sequences}
        return {s: splits[s] for s in ("train", "eval")}, run
