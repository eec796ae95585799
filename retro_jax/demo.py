"""`retro-jax demo`: prepare, train a baseline and RETRO, retro-fit, evaluate, sample; one table.

Layout of the demo's workdir W:
    W/prepare/     the shared offline pipeline (tokenizer, database, keys, index, shards)
    W/baseline/    the baseline twin (same decoder, no retrieval)
    W/retro/       RETRO trained from scratch for the same steps
    W/retrofit/    the baseline retro-fitted: frozen decoder, trained encoder + CCA
    W/demo.json    every number of the final table, and the sample with what each of its chunks
                   retrieved
    W/jax_cache/   compiled programs shared by the demo's processes (`share_compiles`)
Each model folder links `prepare -> ../prepare`, so `retro-jax eval/sample --workdir W/retro`
work on it directly. Rerunning resumes: finished stages return at once (an evaluation is
reused while W/<model>/eval/demo_inputs.json matches its config and checkpoints, the sample while
W/retro/sample/demo_sample.json does), and no training process starts when every stage is done.

On a CPU with two or more cores (`demo.parallel_training`), the two chains, baseline -> its
retro-fit -> the retro-fit's evaluation -> RETRO's sample (once RETRO is trained), and RETRO ->
RETRO's evaluation (with the baseline's, once that is trained, and the database-size sweep), run
at the same time in two processes, each pinned to half of the cores. At the demo's size (d 128)
one step keeps XLA:CPU's two threads busy only part of the time: two one-core processes did
1.26x the work of one two-core process (measured on 2 cores, benchmarks/results/retrieval_pays.md,
a6). Every model is trained and scored exactly as it would be alone; a worker whose demo process
is killed exits too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import os
import queue
import sys
import threading
import time
from typing import Any

from retro_jax.errors import RetroError


def _model_workdir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    link = os.path.join(path, "prepare")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "prepare"), link)
    return path


def _variant(config, **sections):
    """A deep copy of `config` with nested overrides {"model": {"cca_layers": ()}, ...}."""
    out = copy.deepcopy(config)
    for section, values in sections.items():
        for key, value in values.items():
            out[section][key] = value
    return out


class _Prefixed:
    """A text stream that writes whole lines, each starting with `prefix`: two processes share
    one terminal, and a line must not be split by the other's output. A line ends at "\n" or
    "\r" (a progress bar's redraw); `close()` writes an unfinished last line."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).splitlines(keepends=True)
        self.pending = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) else ""
        if lines:
            self.stream.write("".join(self.prefix + line for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.pending:
            self.stream.write(self.prefix + self.pending + "\n")
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Job:
    """One stage of a chain: train a model, evaluate one (its metrics come back to the demo), or
    sample from one. `after` names a stage of another chain that must have finished before this
    one starts."""

    stage: str
    kind: str  # "train" | "eval" | "sample"
    config: Any
    workdir: str
    after: str = ""


def run_job(job: Job, *, progress: bool = True) -> dict | None:
    """Train (returns None), evaluate (writes W/eval, returns the metrics) or sample (returns
    the sample) as `job` says. An evaluation or sample already done with this config on these
    checkpoints returns its result at once."""
    if job.kind == "train":
        from retro_jax.train.loop import train

        train(job.config, job.workdir)
        return None
    if job.kind == "sample":
        return _sample(job)
    from retro_jax.data import files
    from retro_jax.evaluate import evaluate, write_outputs

    eval_dir = os.path.join(job.workdir, "eval")
    if _job_done(job):
        print(f"demo: {job.stage} already done ({eval_dir}/metrics.json)", flush=True)
        return files.read_json(os.path.join(eval_dir, "metrics.json"))
    inputs = _job_inputs(job)
    metrics = evaluate(job.config, job.workdir, progress=progress)
    write_outputs(metrics, eval_dir)
    # last: only a finished evaluation is ever reused
    files.write_json(os.path.join(eval_dir, "demo_inputs.json"), inputs)
    return metrics


def _job_done(job: Job) -> bool:
    """True when run_job(job) would do nothing: a training's last checkpoint is at its
    train.steps, an evaluation's demo_inputs.json matches, the stored sample was made with the
    same inputs (`_stored_sample`). (Whether a finished training's checkpoint fits the config is
    train's own check; a changed config changes every evaluation's inputs, so its chain runs and
    train makes that check.)"""
    from retro_jax.data import files
    from retro_jax.model.load import checkpoint_steps

    if job.kind == "train":
        try:
            steps = checkpoint_steps(job.workdir)
        except RetroError:
            return False
        return bool(steps) and steps[-1] >= int(job.config.train.steps)
    try:
        if job.kind == "sample":
            return _stored_sample(job) is not None
        done_path = os.path.join(job.workdir, "eval", "demo_inputs.json")
        return files.exists(done_path) and files.read_json(done_path) == _job_inputs(job)
    except RetroError:  # a checkpoint it depends on is missing
        return False


def _job_inputs(job: Job) -> dict:
    """What an evaluation's (or the sample's) result depends on: its whole config and the
    checkpoint steps of the model it uses (evaluate's checkpoint_source) and of the baseline an
    evaluation also scores."""
    import hashlib

    from retro_jax.evaluate import checkpoint_source
    from retro_jax.model.load import checkpoint_steps

    config = job.config.to_json_best_effort(sort_keys=True)
    baseline = str(job.config.eval.get("baseline_workdir", "") or "")
    return {
        "config": hashlib.sha256(config.encode()).hexdigest(),
        "checkpoints": checkpoint_steps(checkpoint_source(job.config, job.workdir)),
        "baseline_checkpoints": checkpoint_steps(baseline) if baseline else [],
    }


def _exit_with_parent() -> None:
    """A worker whose parent is gone (killed, even by SIGKILL) exits instead of training on as
    an orphan: a daemon thread polls the parent's pid."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def start_worker(cpus: set[int], compile_cache: str = "") -> None:
    """A chain's process, first thing: pinned to `cpus` (XLA:CPU sizes its thread pool by them),
    malloc kept (retro_jax/host_memory.py: before any other thread starts, or it does not hold),
    the demo's compilation cache (`share_compiles`, when given), then the watch on its parent."""
    os.sched_setaffinity(0, cpus)
    from retro_jax.host_memory import keep_freed_memory

    keep_freed_memory()
    if compile_cache:
        share_compiles(compile_cache)
    _exit_with_parent()


def _run_chain(
    name: str,
    cpus: set[int],
    jobs: list[Job],
    done: dict,
    failed,
    results,
    progress: bool,
    compile_cache: str = "",
) -> None:
    """Worker process: run `jobs` in order on `cpus`; puts (name, {stage: seconds},
    {stage: metrics}, error or None) on `results`. Sets done[stage] (an Event) after each stage
    that another chain waits for; waits for done[job.after] before a job, or gives up (no
    error) once the Event `failed` says another chain failed."""
    start_worker(cpus, compile_cache)
    sys.stdout = _Prefixed(sys.stdout, f"[{name}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[{name}] ")
    seconds: dict[str, float] = {}
    outputs: dict[str, dict] = {}
    try:
        for job in jobs:
            if job.after:
                print(f"=== demo: {job.stage} waits for {job.after} ===", flush=True)
                while not done[job.after].wait(timeout=1.0):
                    if failed.is_set():
                        results.put((name, seconds, outputs, None))
                        return
            print(f"=== demo: {job.stage} (cores {sorted(cpus)}) ===", flush=True)
            start = time.perf_counter()
            metrics = run_job(job, progress=progress)
            seconds[job.stage] = time.perf_counter() - start
            if metrics is not None:
                outputs[job.stage] = metrics
            if job.stage in done:
                done[job.stage].set()
    except BaseException as e:  # reported by the parent, which exits non-zero
        failed.set()
        results.put((name, seconds, outputs, f"{job.stage}: {type(e).__name__}: {e}"))
        raise
    finally:
        sys.stdout.close()
        sys.stderr.close()
    results.put((name, seconds, outputs, None))


def one_after_another(chains: dict[str, list[Job]]) -> list[Job]:
    """The jobs of all chains in one order that keeps each chain's order and runs every job
    after the stage it waits for (`after`): the first chain's next job that may run, each time."""
    pending = [list(jobs) for jobs in chains.values()]
    finished: set[str] = set()
    order: list[Job] = []
    while any(pending):
        ready = [jobs for jobs in pending if jobs and jobs[0].after in finished | {""}]
        if not ready:
            job = next(jobs[0] for jobs in pending if jobs)
            raise RetroError(f"demo: {job.stage!r} waits for {job.after!r}, never run")
        order.append(ready[0].pop(0))
        finished.add(order[-1].stage)
    return order


def parallel_cpus() -> list[set[int]] | None:
    """Two disjoint halves of this process's cores when the demo should train in two processes
    (JAX on CPU, at least two cores), else None."""
    import jax

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jax.default_backend() != "cpu" or len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return [set(cpus[:half]), set(cpus[half:])]


def run_in_parallel(
    chains: dict[str, list[Job]],
    cpus: list[set[int]],
    *,
    progress: bool = True,
    compile_cache: str = "",
) -> tuple[dict[str, float], dict[str, dict]]:
    """Run each chain {name: [Job, ...]} in its own process on its own cores (sharing the
    compilation cache folder `compile_cache`, if given); returns ({stage: seconds}, {eval stage:
    metrics}). RetroError naming the stage if any chain fails."""
    context = multiprocessing.get_context("spawn")  # a fresh JAX in each: no forked threads
    results = context.Queue()
    waited = {job.after for jobs in chains.values() for job in jobs if job.after}
    done = {stage: context.Event() for stage in waited}
    failed = context.Event()
    processes = [
        context.Process(
            target=_run_chain,
            args=(name, cores, jobs, done, failed, results, progress, compile_cache),
            name=name,
        )
        for (name, jobs), cores in zip(chains.items(), cpus)
    ]
    for process in processes:
        process.start()
    try:
        reports = _collect_reports(processes, results)
    finally:  # on a failure or Ctrl-C, stop whatever still runs
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    seconds: dict[str, float] = {}
    outputs: dict[str, dict] = {}
    for name in chains:  # the first failing chain in the given order, whichever failed first
        stage_seconds, stage_outputs, error = reports[name]
        if error:
            raise RetroError(f"demo: chain {name!r} failed at {error}")
        seconds.update(stage_seconds)
        outputs.update(stage_outputs)
    return seconds, outputs


def _collect_reports(processes, results) -> dict[str, tuple[dict, dict, str | None]]:
    """{chain: (stage seconds, eval metrics, error)} from every process; a process that dies
    without a report (killed, out of memory) fails the demo instead of hanging it."""
    reports: dict[str, tuple[dict, dict, str | None]] = {}
    while len(reports) < len(processes):
        try:
            name, stage_seconds, outputs, error = results.get(timeout=2.0)
            reports[name] = (stage_seconds, outputs, error)
        except queue.Empty:
            # A process's report is in the queue before the process exits, so one that has
            # exited with the queue empty died without one.
            dead = [p for p in processes if p.exitcode is not None and p.name not in reports]
            if dead and results.empty():
                raise RetroError(
                    f"demo: training process {dead[0].name!r} exited {dead[0].exitcode}"
                    " without finishing (killed, or out of memory?)"
                ) from None
    return reports


def format_retrieved(chunks: list[dict]) -> str:
    """`retro-jax sample --show-neighbours`'s view of the neighbours stored in demo.json."""
    from retro_jax.sample.live import RetrievedChunk, format_neighbours

    shown = format_neighbours([RetrievedChunk.from_json(c) for c in chunks])
    return shown or "(no chunk was completed: nothing retrieved)"


def share_compiles(path: str) -> None:
    """Point this process's JAX persistent compilation cache at `path` (the demo: W/jax_cache;
    its chain workers are pointed there too). Programs compiled by one stage are then loaded by
    the next that needs them: the BERT's, compiled by prepare, in RETRO's evaluation (the
    database sweep embeds its queries); RETRO's initialisation and scorers in the retro-fit's
    training and evaluation; all of them in a rerun. Values are the same: a cached program is
    the compiled program itself. JAX sets its cache up at the first compile that could use it,
    so a process that compiled with another folder before keeps that one."""
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)


def run_demo(config, workdir: str, *, progress: bool = True) -> dict:
    """Run every stage; returns the summary written to W/demo.json."""
    from retro_jax.prepare.run import run_prepare

    if not config.model.cca_layers:
        raise RetroError("demo: model.cca_layers is empty; the demo needs a RETRO model")
    # The retro-fit's own model options (demo.retrofit_model): its encoder and CCA may differ
    # from RETRO's (a CCA sink costs a retro-fit much of its gain); its decoder is the baseline.
    retrofit_model = dict(config.demo.get("retrofit_model", None) or {})
    unknown = sorted(set(retrofit_model) - set(config.model))
    if unknown:
        raise RetroError(f"demo.retrofit_model.{unknown[0]}: not a model config field")
    os.makedirs(workdir, exist_ok=True)
    cache = ""
    if config.demo.get("share_compiles", True):
        cache = os.path.abspath(os.path.join(workdir, "jax_cache"))
        share_compiles(cache)
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args, **kwargs):
        print(f"\n=== demo: {stage} ===", flush=True)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[stage] = time.perf_counter() - start
        return out

    timed("prepare", run_prepare, config, workdir, progress=progress)

    baseline_dir = _model_workdir(workdir, "baseline")
    retro_dir = _model_workdir(workdir, "retro")
    retrofit_dir = _model_workdir(workdir, "retrofit")
    baseline_cfg = _variant(config, model={"cca_layers": ()})
    retrofit_cfg = _variant(
        config,
        model=retrofit_model,
        train={
            "retrofit_from": baseline_dir,
            "steps": int(config.demo.retrofit_steps),
            "retrofit_sequences": 0,  # the demo's own length, not the paper's 6M sequences
            # its decoder is frozen: with retrieval off it is the baseline whatever it trains on
            "retrieval_dropout": 0.0,
            "warmup_steps": min(int(config.train.warmup_steps), int(config.demo.retrofit_steps)),
            # only the new encoder and CCA train: they take a higher rate than the whole model
            "learning_rate": float(
                config.demo.get("retrofit_learning_rate", 0) or config.train.learning_rate
            ),
        },
    )
    # RETRO's evaluation scores the baseline too, and sweeps the database size (RETRO's alone).
    retro_eval_cfg = _variant(config, eval={"baseline_workdir": baseline_dir})
    retrofit_eval_cfg = _variant(config, model=retrofit_model, eval={"database_fractions": ()})
    # Each chain's stages in order: the retro-fit starts from the trained baseline. The sample
    # (RETRO's) closes the baseline's chain, the shorter one: RETRO's chain decides the time.
    chains = {
        "baseline": [
            Job("train baseline", "train", baseline_cfg, baseline_dir),
            Job("retro-fit", "train", retrofit_cfg, retrofit_dir),
            Job("eval retro-fit", "eval", retrofit_eval_cfg, retrofit_dir),
            Job("sample", "sample", config, retro_dir, after="train RETRO"),
        ],
        "RETRO": [
            Job("train RETRO", "train", config, retro_dir),
            Job("eval RETRO", "eval", retro_eval_cfg, retro_dir, after="train baseline"),
        ],
    }
    cpus = parallel_cpus() if config.demo.get("parallel_training", True) else None
    if cpus and all(_job_done(job) for jobs in chains.values() for job in jobs):
        cpus = None  # a rerun with every stage done: no worker processes to start
    if cpus:  # each chain in its own process; the evaluations and the sample run in there too
        summary_parallel, metrics = timed(
            "train and eval (in parallel)",
            run_in_parallel,
            chains,
            cpus,
            progress=progress,
            compile_cache=cache,
        )
    else:  # one after the other, each job after the one it waits for
        summary_parallel, metrics = {}, {}
        for job in one_after_another(chains):
            metrics[job.stage] = timed(job.stage, run_job, job, progress=progress)
    retro_eval, retrofit_eval = metrics["eval RETRO"], metrics["eval retro-fit"]
    sample = metrics["sample"]
    leakage = {row["alpha"]: row for row in retro_eval["leakage"]}
    eighth = leakage.get(0.125, {})
    summary = {
        "bpb": {
            "baseline": retro_eval["baseline"]["bpb"],
            "retro": retro_eval["retrieval"]["bpb"],
            "retro_off": retro_eval["no_retrieval"]["bpb"],
            "retrofit": retrofit_eval["retrieval"]["bpb"],
            "retrofit_off": retrofit_eval["no_retrieval"]["bpb"],
        },
        "bpb_alpha_1_8": {
            "chunks": eighth.get("chunks"),
            "baseline": eighth.get("baseline_bpb"),
            "retro": eighth.get("retrieval_bpb"),
            "retro_off": eighth.get("no_retrieval_bpb"),
            # standard errors of RETRO's and RETRO[OFF]'s difference to the baseline there
            "retro_se": eighth.get("retrieval_se"),
            "retro_off_se": eighth.get("no_retrieval_se"),
        },
        "eval_tokens": retro_eval["retrieval"]["tokens"],
        "eval_bytes": retro_eval["retrieval"]["bytes"],
        "num_neighbours": retro_eval["retrieval"]["num_neighbours"],
        "leakage": retro_eval["leakage"],
        "leakage_plot": os.path.join(retro_dir, "eval", "leakage.png"),
        "database_sweep": retro_eval.get("database_sweep", []),
        "database_plot": os.path.join(retro_dir, "eval", "database.png"),
        "sample": sample,
        "seconds": seconds,
        "parallel_seconds": summary_parallel,
    }
    with open(os.path.join(workdir, "demo.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(workdir, "demo.json.tmp"), os.path.join(workdir, "demo.json"))
    return summary


def _sample_path(retro_dir: str) -> str:
    return os.path.join(retro_dir, "sample", "demo_sample.json")


def _stored_sample(job: Job) -> dict | None:
    """The sample stored in W/retro/sample/demo_sample.json, if made with this job's config and
    RETRO's present checkpoints; else None."""
    from retro_jax.data import files

    path = _sample_path(job.workdir)
    if files.exists(path) and (stored := files.read_json(path))["inputs"] == _job_inputs(job):
        return stored["sample"]
    return None


def _sample(job: Job) -> dict:
    """The demo's sample from RETRO (prompt, text, what each chunk retrieved), or the stored
    one (`_stored_sample`)."""
    from retro_jax.data import files
    from retro_jax.sample.sampler import Sampler

    config, path = job.config, _sample_path(job.workdir)
    stored = _stored_sample(job)
    if stored is not None:
        print(f"demo: sample already done ({path})", flush=True)
        return stored
    result = Sampler.from_workdir(config, job.workdir).generate(
        str(config.demo.prompt),
        max_new_tokens=int(config.demo.max_new_tokens),
        seed=int(config.demo.seed),
    )
    sample = {
        "prompt": result.prompt,
        "text": result.text,
        "neighbours": [chunk.to_json() for chunk in result.chunks],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {"inputs": _job_inputs(job), "sample": sample})
    return sample


def format_summary(summary: dict) -> str:
    def num(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    def change(x, ref):
        bad = x is None or ref is None or ref == 0 or math.isnan(x) or math.isnan(ref)
        return "" if bad else f"{100 * (x - ref) / ref:+.1f}%"

    b, e = summary["bpb"], summary["bpb_alpha_1_8"]
    lines = [
        "",
        f"held-out bits-per-byte ({summary['eval_tokens']:,} tokens, {summary['eval_bytes']:,}"
        f" bytes, k={summary['num_neighbours']})",
        f"  {'model':<28}{'all chunks':>12}{'vs baseline':>12}{'alpha<=1/8':>12}",
        f"  {'baseline':<28}{num(b['baseline']):>12}{'':>12}{num(e['baseline']):>12}",
    ]
    for name, key in (("RETRO", "retro"), ("RETRO[OFF]", "retro_off")):
        vs = change(b[key], b["baseline"])
        lines.append(f"  {name:<28}{num(b[key]):>12}{vs:>12}{num(e[key]):>12}")
    for name, key in (
        ("retro-fitted baseline", "retrofit"),
        ("retro-fitted [OFF]", "retrofit_off"),
    ):
        lines.append(f"  {name:<28}{num(b[key]):>12}{change(b[key], b['baseline']):>12}")
    lines.append(
        f"  (alpha<=1/8: the {e['chunks']} evaluation chunks sharing fewer than 1/8 of their"
        " tokens as one run with any neighbour)"
    )
    if None not in (e.get("retro"), e.get("baseline"), e.get("retro_se")):
        lines.append(
            f"  RETRO - baseline at alpha<=1/8: {e['retro'] - e['baseline']:+.4f} bpb, one"
            f" standard error over those chunks {e['retro_se']:.4f}"
        )
    lines += [
        f"leakage plot: {summary['leakage_plot']}",
    ]
    curve = summary.get("leakage", [])
    if curve:
        lines.append(
            "bpb over the chunks whose longest run shared with a neighbour is <= alpha * m:"
        )
        from retro_jax.leakage import curve_lines

        lines += ["  " + line for line in curve_lines(curve)]
    sweep = summary.get("database_sweep", [])
    if sweep:
        lines.append("RETRO's bpb by the size of the database it retrieves from:")
        lines.append(f"  {'fraction':>9}{'chunks':>10}{'tokens':>12}{'bpb':>10}")
        lines += [
            f"  {r['fraction']:>9.3f}{r['chunks']:>10,}{r['tokens']:>12,}{num(r['bpb']):>10}"
            for r in sweep
        ]
        lines.append(f"database plot: {summary['database_plot']}")
    lines += [
        f"sample: {summary['sample']['prompt']!r} -> {summary['sample']['text']!r}",
        "retrieved neighbours of the sample (each chunk's neighbours condition the next chunk):",
        format_retrieved(summary["sample"].get("neighbours", [])),
        "",
        "wall time per stage:",
    ]
    for stage, sec in summary["seconds"].items():
        lines.append(f"  {stage:<28}{sec:>10.1f} s")
        if (
            stage == "train and eval (in parallel)"
        ):  # what each of its stages took, inside that time
            parallel = summary.get("parallel_seconds", {})
            lines += [f"    {name:<24}({s:>8.1f} s)" for name, s in parallel.items()]
    lines.append(f"  {'total':<28}{sum(summary['seconds'].values()):>10.1f} s")
    return "\n".join(lines)


def main(config, workdir: str | None) -> dict:
    if not workdir:
        raise RetroError("demo: --workdir is required")
    summary = run_demo(config, workdir)
    print(format_summary(summary))
    return summary
