"""`retro-jax prepare`: raw text -> neighbour record shards, as resumable stages.

The local driver of the stages (the graph and each stage's outputs: `retro_jax.prepare`).
Each stage builds in `W/prepare/<stage>.partial/` and is renamed into place when complete.
`W/prepare/manifest.json` records, per stage, a hash of the settings and upstream outputs it was
built from, its output checksum, counts and package versions: a rerun skips stages whose hash
is unchanged, and a stage that must be rebuilt first removes its own and all downstream
outputs. `keys` and `neighbours` resume inside the stage: finished shards of an interrupted
run with the same hash are kept.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import time

from retro_jax.config import prepare_dir as prepare_dir_of
from retro_jax.data import files
from retro_jax.data.records import RECORDS_INFO, RecordSpec
from retro_jax.errors import RetroError

log = logging.getLogger("retro_jax.prepare")

MANIFEST = "manifest.json"
DEPENDS = {
    "dedup": (),
    "tokenizer": ("dedup",),
    "chunks": ("dedup", "tokenizer"),
    "keys": ("chunks", "tokenizer"),
    "index": ("keys",),
    "sequences": ("dedup", "tokenizer"),
    "neighbours": ("sequences", "chunks", "keys", "index", "tokenizer"),
}
STAGES = tuple(DEPENDS)
RESUMABLE = ("keys", "neighbours")  # keep finished shards of an interrupted run
PACKAGES = (
    "retro_jax",
    "numpy",
    "jax",
    "flax",
    "sentencepiece",
    "datasketch",
    "transformers",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "scann",
)
# Test hook: "STAGE:N" SIGKILLs this process after N new shards of STAGE (resume tests).
KILL_ENV = "RETRO_JAX_PREPARE_KILL_AFTER"


def downstream(stage: str) -> list[str]:
    """Stages that (transitively) depend on `stage`, in run order."""
    found = {stage}
    for name in STAGES:
        if any(d in found for d in DEPENDS[name]):
            found.add(name)
    return [s for s in STAGES if s in found and s != stage]


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(paths: list[str], base: str) -> str:
    """sha256 over the names (relative to `base`) and contents of files (folders walked in
    sorted order)."""
    digest = hashlib.sha256()
    found = []
    for path in paths:
        if files.isdir(path):
            for root, dirs, names in files.walk(path):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names)]
        elif files.exists(path):
            found.append(path)
    for name in found:
        digest.update(os.path.relpath(name, base).encode() + b"\0")
        with files.open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


class Manifest:
    """W/prepare/manifest.json: {"stages": {stage: entry}}, saved atomically after each stage."""

    def __init__(self, prepare_dir: str):
        self.path = os.path.join(prepare_dir, MANIFEST)
        self.stages: dict[str, dict] = {}
        if files.exists(self.path):
            try:
                self.stages = files.read_json(self.path).get("stages", {})
            except (OSError, json.JSONDecodeError) as e:
                raise RetroError(f"{self.path}: unreadable manifest ({e}); delete it") from e

    def save(self) -> None:
        files.write_json(self.path, {"stages": self.stages}, indent=1, sort_keys=True)


def keys_embedding(prepare_dir: str) -> tuple[int, str]:
    """(BERT max_len, compute dtype) with which the keys stage embedded the database, from the
    manifest: live retrieval (sample) and the eval database sweep embed their queries the same
    way. A RetroError when the manifest does not say (rather than the config's settings, which
    may differ from those the keys were built with)."""
    path = os.path.join(prepare_dir, MANIFEST)
    try:
        settings = files.read_json(path)["stages"]["keys"]["settings"]
        return int(settings["max_len"]), str(settings.get("dtype", "float32"))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise RetroError(
            f"{path}: no record of how the database keys were embedded ({type(e).__name__}: "
            f"{e}), so queries cannot be embedded like them (retrieval.bert_max_len, "
            "retrieval.embed_dtype); run `retro-jax prepare` on this workdir"
        ) from e


class _KillHook:
    """Counts finished shards; SIGKILLs the process when KILL_ENV says so (tests only)."""

    def __init__(self, stage: str):
        spec = os.environ.get(KILL_ENV, "")
        name, _, count = spec.partition(":")
        self.limit = int(count) if name == stage and count.isdigit() else 0
        self.done = 0

    def __call__(self, _shard) -> None:
        self.done += 1
        if self.limit and self.done >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)


def run_prepare(
    config,
    workdir: str,
    *,
    progress: bool = True,
    until: str | None = None,
    runner: str | None = None,
    beam_args: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Run (or resume) every stage, or those up to `until`; returns stage -> summary (with
    `skipped` for stages that were up to date).

    runner: None builds every stage in this process; a Beam runner name (DirectRunner,
    DataflowRunner, FlinkRunner, SparkRunner, ...) builds the distributable stages as Beam
    pipelines with `beam_args` as pipeline options. Both give the same outputs, so a workdir
    prepared by one is up to date for the other.
    """
    from retro_jax.prepare.stages import StageContext

    if not workdir:
        raise RetroError("prepare: --workdir is required")
    if beam_args and not runner:
        raise RetroError(f"prepare: Beam pipeline options ({beam_args[0]}) need --runner")
    # Settings that a late stage would refuse, checked before the costly stages run.
    for key in ("records_per_shard", "chunks_per_shard"):
        if int(config.data[key]) <= 0:
            raise RetroError(f"data.{key}={config.data[key]} must be positive")
    RecordSpec(
        int(config.data.seq_len),
        int(config.model.chunk_size),
        int(config.data.num_neighbours_stored),
    )
    prepare_dir = prepare_dir_of(config, workdir)
    if runner:
        try:
            from retro_jax.prepare.beam.stages import BeamStageContext, pipeline_options
        except ImportError as e:
            raise RetroError(
                f"prepare --runner={runner} needs Apache Beam: pip install -e '.[beam]' ({e})"
            ) from e
        options = pipeline_options(runner, list(beam_args))
        ctx = BeamStageContext(config, prepare_dir, options, progress=progress)
    else:
        ctx = StageContext(config, prepare_dir, progress=progress)
    files.makedirs(prepare_dir)
    manifest = Manifest(prepare_dir)
    if "index" not in manifest.stages:
        ctx.check_foreign_index()  # an index this workdir's manifest does not know
    versions = package_versions()
    results: dict[str, dict] = {}
    if until is not None and until not in STAGES:
        raise RetroError(f"prepare: unknown stage {until!r}; stages are {', '.join(STAGES)}")
    for stage in STAGES[: STAGES.index(until) + 1] if until else STAGES:
        upstream = {
            d: manifest.stages[d]["hash"] + manifest.stages[d]["digest"] for d in DEPENDS[stage]
        }
        settings = ctx.settings(stage)
        key = _hash({"settings": settings, "upstream": upstream})
        entry = manifest.stages.get(stage)
        outputs = ctx.outputs(stage)
        if entry and entry["hash"] == key and all(files.exists(p) for p in outputs):
            results[stage] = dict(entry["counts"], skipped=True)
            print(f"prepare {stage}: up to date, skipped", flush=True)
            continue
        # Nothing stale may look finished: drop this stage and everything downstream first.
        for name in [stage] + downstream(stage):
            manifest.stages.pop(name, None)
            for path in ctx.outputs(name):
                files.delete(path)
        manifest.save()
        partial = os.path.join(prepare_dir, stage + ".partial")
        marker = os.path.join(partial, ".stage-hash")
        if stage not in RESUMABLE or not _read(marker) == key:
            files.delete(partial)
        files.makedirs(partial)
        with files.open(marker, "w") as f:
            f.write(key)
        start = time.time()
        summary = ctx.build(stage, partial, _KillHook(stage))
        # `run`: what this run did (time, shards resumed); the rest are the outputs' counts,
        # the same however often the stage was interrupted.
        run = dict(summary.pop("run", {}), seconds=round(time.time() - start, 3))
        files.delete(marker)  # (a stage may have replaced its partial folder wholesale)
        ctx.commit(stage, partial)
        manifest.stages[stage] = dict(
            hash=key,
            digest=tree_digest(ctx.outputs(stage), prepare_dir),
            settings=settings,
            upstream=upstream,
            counts=summary,
            run=run,
            versions=versions,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        manifest.save()
        ctx.report(stage, summary, run)
        results[stage] = dict(summary, run=run, skipped=False)
    return results


def _read(path: str) -> str | None:
    try:
        return files.read_text(path)
    except OSError:
        return None


def main(config, workdir: str, *, runner: str | None = None, beam_args=()) -> None:
    """CLI entry: `retro-jax prepare --config CFG --workdir W [--runner=R BEAM_OPTIONS...]`."""
    logging.getLogger("retro_jax").setLevel(logging.INFO)
    results = run_prepare(config, workdir, runner=runner, beam_args=tuple(beam_args))
    info = os.path.join(prepare_dir_of(config, workdir), RECORDS_INFO)
    built = [s for s, r in results.items() if not r.get("skipped")]
    print(
        f"prepare: done ({', '.join(built) or 'nothing to rebuild'}); records described in {info}"
    )


__all__ = ["run_prepare", "main", "Manifest", "keys_embedding", "STAGES", "DEPENDS"]
