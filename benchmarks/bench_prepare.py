"""Whole `prepare` on the sotu corpus: wall time and peak RSS of every stage.

    python benchmarks/bench_prepare.py --workdir /tmp/bench-prepare [--repeat 4] [--docs 30]
    python benchmarks/bench_prepare.py --workdir /tmp/bench-beam --runner DirectRunner \
        --beam-args="--direct_num_workers=2 --direct_running_mode=multi_processing" --compare

The corpus is the sotu training split written as text files (`--repeat R` copies, each under its
own folder so every copy has distinct document ids; `--docs N` keeps the first N addresses of
each copy) and the sotu evaluation split. Each stage runs in its own child process (prepare
resumes from the manifest), so the peak RSS of each stage is measured separately with
os.wait4's rusage (with a Beam runner: the largest single process, driver or worker). With
`--runner`, the stages are Beam pipelines; `--compare` also runs the local path on the same
corpus and checks that both give the same files. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from retro_jax.prepare.run import STAGES  # noqa: E402

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from retro_jax.prepare.run import run_prepare
sys.path.insert(0, {corpus!r})
from bench_config import get_config
results = run_prepare(
    get_config(), {workdir!r}, progress=False, until={stage!r}, runner={runner!r},
    beam_args={beam_args!r},
)
print("RESULT " + json.dumps(results[{stage!r}]))
"""

CONFIG = """
from retro_jax.config import default_config

def get_config():
    c = default_config()
    c.data.train_source = {train!r}
    c.data.eval_source = {eval!r}
    c.model.vocab_size = {vocab}
    c.model.chunk_size = {chunk}
    c.data.seq_len = {seq_len}
    c.data.num_neighbours_stored = {neighbours}
    c.data.chunks_per_shard = {chunks_per_shard}
    c.data.records_per_shard = {records_per_shard}
    c.retrieval.embed_batch_size = {batch}
    return c
"""


def write_corpus(folder: str, repeat: int, docs: int, eval_docs: int) -> tuple[str, str, int]:
    """sotu train split x repeat (distinct paths, so distinct ids) + the eval split, as files."""
    from retro_jax.data.sources import sotu_speeches

    speeches = sotu_speeches()
    train, held_out = speeches[: len(speeches) - eval_docs], speeches[len(speeches) - eval_docs :]
    train = train[:docs] if docs else train
    size = 0
    for r in range(repeat):
        os.makedirs(os.path.join(folder, "train", f"copy{r}"), exist_ok=True)
        for path, _ in train:
            shutil.copyfile(path, os.path.join(folder, "train", f"copy{r}", os.path.basename(path)))
            size += os.path.getsize(path)
    os.makedirs(os.path.join(folder, "eval"), exist_ok=True)
    for path, _ in held_out:
        shutil.copyfile(path, os.path.join(folder, "eval", os.path.basename(path)))
    return os.path.join(folder, "train", "*", "*.txt"), os.path.join(folder, "eval", "*.txt"), size


def run_stage(corpus: str, workdir: str, stage: str, runner=None, beam_args=()) -> dict:
    code = CHILD.format(
        root=ROOT,
        corpus=corpus,
        workdir=workdir,
        stage=stage,
        runner=runner,
        beam_args=tuple(beam_args),
    )
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"stage {stage} failed with exit code {child.returncode}")
    result = json.loads(out.split("RESULT ", 1)[1])
    return dict(
        wall_s=round(time.time() - start, 1),
        stage_s=result.get("run", {}).get("seconds"),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        counts={k: v for k, v in result.items() if k not in ("run", "skipped")},
        run=result.get("run", {}),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--docs", type=int, default=0, help="first N training addresses (0 = all)")
    parser.add_argument("--eval-docs", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--neighbours", type=int, default=4)
    parser.add_argument("--chunks-per-shard", type=int, default=8192)
    parser.add_argument("--records-per-shard", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runner", default=None, help="a Beam runner, e.g. DirectRunner")
    parser.add_argument("--beam-args", default="", help="Beam pipeline options, one string")
    parser.add_argument("--compare", action="store_true", help="also run the local path")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    corpus = os.path.join(args.workdir, "corpus")
    train, evaluation, size = write_corpus(corpus, args.repeat, args.docs, args.eval_docs)
    with open(os.path.join(corpus, "bench_config.py"), "w") as f:
        f.write(
            CONFIG.format(
                train=train,
                eval=evaluation,
                vocab=args.vocab,
                chunk=args.chunk,
                seq_len=args.seq_len,
                neighbours=args.neighbours,
                chunks_per_shard=args.chunks_per_shard,
                records_per_shard=args.records_per_shard,
                batch=args.batch,
            )
        )
    work = os.path.join(args.workdir, "work")
    beam_args = args.beam_args.split()
    stages = {stage: run_stage(corpus, work, stage, args.runner, beam_args) for stage in STAGES}
    result = dict(
        benchmark="prepare" if not args.runner else "prepare_beam",
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        corpus=dict(repeat=args.repeat, docs=args.docs or "all", train_bytes=size),
        settings=vars(args),
        stages=stages,
        total_s=round(sum(s["wall_s"] for s in stages.values()), 1),
        max_peak_rss_mb=max(s["peak_rss_mb"] for s in stages.values()),
    )
    if args.compare:
        local_work = os.path.join(args.workdir, "local")
        local = {stage: run_stage(corpus, local_work, stage) for stage in STAGES}
        result["local"] = dict(
            stages=local,
            total_s=round(sum(s["wall_s"] for s in local.values()), 1),
            max_peak_rss_mb=max(s["peak_rss_mb"] for s in local.values()),
        )
        result["identical_outputs"] = same_outputs(work, local_work)
    print(json.dumps(result, indent=1))


def same_outputs(a: str, b: str) -> bool:
    """Every file of the two prepare folders (but manifest.json) is byte-identical."""

    def files(root):
        root = os.path.join(root, "prepare")
        found = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
        found.pop("manifest.json", None)
        return found

    return files(a) == files(b)


if __name__ == "__main__":
    main()
