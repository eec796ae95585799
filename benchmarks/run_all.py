"""Run every benchmark of the project and rewrite benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--quick] [--only model_step,embed,...] [--workdir /tmp/bench]

Each benchmark prints one JSON object; it is saved as benchmarks/results/<name>.json and
RESULTS.md is rebuilt from all saved JSON files (so a partial rerun keeps the other figures)
plus the hand-written notes in benchmarks/results/*.md. Run it on a quiet machine: the figures
are only as good as the machine is idle, and ratios measured in one run are what to compare.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

BEAM = [
    "--runner",
    "DirectRunner",
    "--beam-args=--direct_num_workers=2 --direct_running_mode=multi_processing",
    "--compare",
]
# name -> (script, full arguments, --quick arguments); "{workdir}" is filled in.
BENCHMARKS = {
    "model_step": ("bench_model_step.py", ["--presets", "tiny,172m"], ["--presets", "tiny"]),
    # RETRO-pytorch's shapes: ours of the side-by-side table in benchmarks/results/model.md.
    "model_step_peer": (
        "bench_model_step.py",
        ["--peer-shapes", "--presets", "small,172m"],
        ["--peer-shapes", "--presets", "small"],
    ),
    # RETRO's MFU over its baseline's as the vocabulary's head shrinks (#19: what the small
    # shapes' ratio below 1 is made of).
    "model_step_vocab": (
        "bench_model_step.py",
        ["--peer-shapes", "--presets", "small", "--vocab-sizes", "32000,8000,1000", "--steps", "7"],
        ["--peer-shapes", "--presets", "small", "--vocab-sizes", "32000,1000", "--steps", "2"],
    ),
    # The 172m step's products alone, XLA:CPU against PyTorch when $RETRO_JAX_TORCH_PYTHON names
    # an interpreter with torch (issue #19's reproduction; else XLA's side only).
    "matmul": ("bench_matmul.py", [], ["--scale", "4", "--rounds", "1"]),
    # Each piece of the small step on all cores and on one (#19: cores kept busy).
    "core_scaling": ("bench_core_scaling.py", [], ["--quick", "--repeats", "3"]),
    "compile": ("bench_compile.py", [], ["--presets", "172m", "--seq-len", "256"]),
    "compile_decode": ("bench_compile.py", ["--decode"], ["--decode", "--presets", "172m"]),
    "embed": ("bench_embed.py", ["--chunks", "2048"], ["--chunks", "256", "--no_baseline"]),
    "index": ("bench_index.py", ["--sizes", "100000", "1000000"], ["--sizes", "20000"]),
    "pipeline": ("bench_pipeline.py", [], ["--steps", "10", "--rounds", "2"]),
    "sample": ("bench_sample.py", [], ["--lengths", "512", "--index-sizes", "10000"]),
    "eval": ("bench_eval.py", [], []),
    "memory_plan": ("bench_memory_plan.py", ["--preset", "172m"], ["--preset", "tiny"]),
    "prepare": (
        "bench_prepare.py",
        ["--workdir", "{workdir}/prepare", "--repeat", "1"],
        ["--workdir", "{workdir}/prepare", "--docs", "10"],
    ),
    # The Beam path with 2 worker processes against the local path, same corpus, one run.
    "prepare_beam": (
        "bench_prepare.py",
        ["--workdir", "{workdir}/prepare_beam", "--repeat", "1", *BEAM],
        ["--workdir", "{workdir}/prepare_beam", "--docs", "10", *BEAM],
    ),
}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    info["cpus"] = os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["load_average"] = os.getloadavg()
    return info


def run(name: str, quick: bool, workdir: str) -> dict | None:
    script, full, fast = BENCHMARKS[name]
    args = [a.replace("{workdir}", workdir) for a in (fast if quick else full)]
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    print(f"run_all: {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"run_all: {name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    text = out.stdout[out.stdout.index("{") : out.stdout.rindex("}") + 1]
    result = {
        "benchmark": name,
        "command": "python benchmarks/" + " ".join([script, *args]),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "result": json.loads(text),
    }
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
    elif (
        isinstance(value, list)
        and len(value) <= 8
        and all(not isinstance(v, (dict, list)) for v in value)
    ):
        yield prefix, ", ".join(_fmt(v) for v in value)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _flatten(sub, f"{prefix}[{i}]")
    else:
        yield prefix, _fmt(value)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results_md() -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `python benchmarks/run_all.py` from `benchmarks/results/*.json` (measured",
        "figures, each with its command, machine and date) and the notes in",
        "`benchmarks/results/*.md`. CPU figures come from a shared 2-core machine: compare ratios",
        "measured in one run, not absolute numbers across runs.",
        "",
    ]
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        m = r["machine"]
        lines += [
            f"## {r['benchmark']}",
            "",
            f"`{r['command']}` — {r['date']}, {m['cpu']} ({m['cpus']} cores), load average "
            f"{', '.join(f'{x:.1f}' for x in m['load_average'])}, {r['seconds']} s",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in _flatten(r["result"])]
        lines.append("")
    notes = sorted(glob.glob(os.path.join(RESULTS, "*.md")))
    if notes:
        lines += ["# Notes and earlier measurements", ""]
        for path in notes:
            with open(path) as f:
                body = f.read().strip()
            body = "\n".join(
                ("#" + line) if line.startswith("#") else line for line in body.split("\n")
            )
            lines += [body, ""]
    text = "\n".join(lines)
    target = os.path.join(HERE, "RESULTS.md")
    with open(target + ".tmp", "w") as f:
        f.write(text)
    os.replace(target + ".tmp", target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--only", default="", help="comma-separated names: " + ",".join(BENCHMARKS))
    parser.add_argument("--workdir", default="/tmp/retro_jax_bench")
    parser.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md only")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if not args.report_only:
        names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            sys.exit(f"run_all: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
        failed = [n for n in names if run(n, args.quick, args.workdir) is None]
        if failed:
            print(f"run_all: failed: {failed}", file=sys.stderr)
    print(f"run_all: wrote {write_results_md()}")


if __name__ == "__main__":
    main()
