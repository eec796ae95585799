"""End to end: `retro-jax demo` at its smallest, and the kernel-docs corpus through every stage."""

import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import FAST_COMPILE_ENV

from retro_jax.data import sources
from retro_jax.errors import RetroError

# Compiles outweigh what the programs compute here (a few steps of small models; BERT at a few
# padded lengths): this file's programs and the demo's processes compile with most
# optimizations off (tests/conftest.py).
pytestmark = pytest.mark.fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LINUX_DOC = bool(glob.glob(sources.LINUX_DOC_GLOB))


def _finite(values):
    return all(v is not None and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_demo_smallest_prints_a_table_of_finite_numbers(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "retro_jax.cli", "demo", "--workdir", str(workdir)]
    cmd += [f"--config={ROOT}/experiments/demo.py:smallest"]
    # every compile cached, however quick (JAX's default: those over a second)
    env = dict(os.environ, **FAST_COMPILE_ENV, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("baseline", "RETRO", "RETRO[OFF]", "retro-fitted baseline", "leakage plot"):
        assert row in out.stdout
    # One compilation cache for all of the demo's processes: prepare's BERT (main process), the
    # train steps (the chain workers) and the sampler's decoding (main process again).
    cached = os.listdir(workdir / "jax_cache")
    for program in ("jit__pooled", "jit_step", "jit__jitted_feed"):
        assert any(name.startswith(program + "-") for name in cached), (program, cached)
    summary = json.loads((workdir / "demo.json").read_text())
    assert _finite(summary["bpb"].values())
    assert _finite(summary["seconds"].values())
    assert os.path.getsize(summary["leakage_plot"]) > 1000
    # The default corpus: transformers' model code, neighbours aligned and reranked, and RETRO
    # scored against half of the database and all of it (nested: more chunks, printed).
    sweep = summary["database_sweep"]
    assert [r["fraction"] for r in sweep] == [0.5, 1.0] and _finite(r["bpb"] for r in sweep)
    assert sweep[0]["chunks"] < sweep[1]["chunks"] and "by the size of the database" in out.stdout
    assert os.path.getsize(summary["database_plot"]) > 1000
    assert sweep[1]["bpb"] == pytest.approx(summary["bpb"]["retro"], rel=1e-6)  # exact index
    # The sample comes with what its chunks retrieved, stored and printed after it.
    chunks = summary["sample"]["neighbours"]
    assert chunks and all(isinstance(c["text"], str) and c["neighbours"] for c in chunks)
    retrieved = [n for c in chunks for n in c["neighbours"] if n["id"] >= 0]
    assert retrieved and all(isinstance(n["text"], str) and n["text"] for n in retrieved)
    assert all(n["document"].startswith("python:transformers/models/") for n in retrieved)
    assert all(isinstance(n["continuation"], str) for n in retrieved)
    shown = out.stdout[out.stdout.index("sample: ") :]
    assert "retrieved neighbours of the sample" in shown
    assert all(f"chunk {c['chunk']} ({c['source']})" in shown for c in chunks)
    # On 2+ cores the two training chains ran at once, each process's lines marked with its name.
    if len(os.sched_getaffinity(0)) >= 2:
        # (RETRO's sample too, at the end of the baseline's chain)
        stages = {"train baseline", "train RETRO", "retro-fit", "eval RETRO", "eval retro-fit"}
        assert set(summary["parallel_seconds"]) == stages | {"sample"}
        assert "[RETRO] step" in out.stdout and "[baseline] step" in out.stdout
    # RETRO has the demo's CCA options, the retro-fit its own (demo.retrofit_model: no sink).
    from retro_jax.model.load import find_checkpoints, read_model_config

    retro, retrofit = (
        read_model_config(find_checkpoints(str(workdir / name))[0])
        for name in ("retro", "retrofit")
    )
    assert retro.cca_sink and retro.cca_match_bias and retro.cca_running_match == 8
    assert not retrofit.cca_sink and retrofit.cca_match_bias and retrofit.cca_running_match == 8
    # The retro-fitted model with retrieval off is exactly the baseline it was built from.
    assert summary["bpb"]["retrofit_off"] == pytest.approx(summary["bpb"]["baseline"], abs=1e-6)
    # A rerun finds every stage done, the evaluations included, and gives the same table.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((workdir / "demo.json").read_text())["bpb"] == summary["bpb"]
    for stage in ("eval RETRO", "eval retro-fit", "sample"):
        assert f"demo: {stage} already done" in again.stdout
    assert "[RETRO]" not in again.stdout  # nothing left to do: no training processes started


def test_linux_doc_source_splits_deterministically():
    if not HAS_LINUX_DOC:
        pytest.skip("Debian's linux-doc is not installed (apt-get install linux-doc)")
    config = __import__("retro_jax.config", fromlist=["x"]).default_config()
    config.data.train_source = config.data.eval_source = "linux-doc"
    train = [d.key for d in sources.open_source(config, "train").documents()]
    held = [d.key for d in sources.open_source(config, "eval").documents()]
    assert not set(train) & set(held)
    assert 0.005 < len(held) / (len(train) + len(held)) < 0.05
    assert not any("translations" in k for k in train + held)
    assert held == [d.key for d in sources.open_source(config, "eval").documents()]


def test_linux_doc_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources, "LINUX_DOC_GLOB", "/nonexistent/linux-doc-*/html/_sources")
    config = __import__("retro_jax.config", fromlist=["x"]).default_config()
    config.data.train_source = "linux-doc"
    with pytest.raises(sources.RetroError, match="apt-get install linux-doc"):
        list(sources.open_source(config, "train").documents())


def _demo_config(arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", f"{ROOT}/experiments/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.slow
def test_linux_doc_corpus_end_to_end(tmp_path):
    """The kernel docs through prepare, a few RETRO steps and evaluation."""
    if not HAS_LINUX_DOC:
        pytest.skip("Debian's linux-doc is not installed (apt-get install linux-doc)")
    from retro_jax.evaluate import evaluate
    from retro_jax.prepare.run import run_prepare
    from retro_jax.train.loop import train

    config = _demo_config("smallest,linux-doc")
    config.data.max_docs = 16
    config.data.eval_max_docs = 4  # (eval.max_batches scores 4 batches of them)
    config.train.steps = 3
    workdir = str(tmp_path / "linux-doc")
    stages = run_prepare(config, workdir, progress=False)
    assert {"dedup", "chunks", "index", "neighbours"} <= set(stages)
    info = json.loads((tmp_path / "linux-doc" / "prepare" / "records.json").read_text())
    assert info["splits"]["train"]["records"] > 0 and info["splits"]["eval"]["records"] > 0
    train(config, workdir)
    metrics = evaluate(config, workdir, progress=False)
    assert metrics["retrieval"]["tokens"] > 0
    assert _finite([metrics["retrieval"]["bpb"], metrics["no_retrieval"]["bpb"]])


def test_prefixed_stream_writes_whole_marked_lines():
    import io

    from retro_jax.demo import _Prefixed

    out = io.StringIO()
    stream = _Prefixed(out, "[x] ")
    stream.write("step 1\nstep")
    assert out.getvalue() == "[x] step 1\n"  # the unfinished line waits for its end
    stream.write(" 2\n\nbar\r")
    stream.write("bar done\n")
    stream.write("last")
    stream.close()
    assert out.getvalue() == "[x] step 1\n[x] step 2\n[x] \n[x] bar\r[x] bar done\n[x] last\n"


def test_a_finished_evaluation_is_reused_only_for_its_config_and_checkpoints(tmp_path):
    """run_job's resume key: an evaluation is redone when its config, the model's checkpoints or
    the scored baseline's checkpoints change, and only then."""
    from retro_jax.demo import Job, _job_inputs
    from retro_jax.model.load import MODEL_CONFIG

    config = _demo_config("smallest")
    model, baseline = tmp_path / "retro", tmp_path / "baseline"
    for folder in (model / "checkpoints" / "6", baseline / "checkpoints" / "6"):
        folder.mkdir(parents=True)
        (folder.parent / MODEL_CONFIG).write_text("{}")
    config.eval.baseline_workdir = str(baseline)
    job = Job("eval RETRO", "eval", config, str(model))
    first = _job_inputs(job)
    assert first["checkpoints"] == [6] and first["baseline_checkpoints"] == [6]
    assert (
        _job_inputs(Job("eval RETRO", "eval", config.copy_and_resolve_references(), str(model)))
        == first
    )
    changed = config.copy_and_resolve_references()
    changed.eval.database_fractions = (1.0,)
    assert _job_inputs(Job("eval RETRO", "eval", changed, str(model)))["config"] != first["config"]
    (baseline / "checkpoints" / "12").mkdir()
    assert _job_inputs(job)["baseline_checkpoints"] == [6, 12]
    (model / "checkpoints" / "12").mkdir()
    assert _job_inputs(job)["checkpoints"] == [6, 12]


def test_parallel_training_names_the_failing_stage(tmp_path):
    """A chain that fails in its worker process fails the demo with the stage and the cause; a
    chain waiting for a stage of the failed one gives up instead of waiting forever."""
    from retro_jax.demo import Job, parallel_cpus, run_in_parallel
    from retro_jax.errors import RetroError

    config = _demo_config("smallest")
    halves = parallel_cpus() or [set(os.sched_getaffinity(0))] * 2
    assert not set.intersection(*halves) or len(os.sched_getaffinity(0)) < 2
    chains = {
        "first": [
            Job("train nothing", "train", config, str(tmp_path / "nowhere")),
            Job("never reached", "train", config, str(tmp_path / "nowhere")),
        ],
        "second": [Job("eval nothing", "eval", config, str(tmp_path / "x"), after="never reached")],
    }
    with pytest.raises(
        RetroError, match=r"demo: chain 'first' failed at train nothing: RetroError: "
    ):
        run_in_parallel(chains, halves)


def test_one_after_another_keeps_each_chain_order_and_every_wait():
    """Without parallel workers the demo runs its chains' jobs in one order: each chain's own
    order kept, and a job that waits for another chain's stage after that stage."""
    from retro_jax.demo import Job, one_after_another

    chains = {
        "baseline": [Job("b1", "train", None, ""), Job("b2", "sample", None, "", after="r1")],
        "RETRO": [Job("r1", "train", None, ""), Job("r2", "eval", None, "", after="b1")],
    }
    assert [job.stage for job in one_after_another(chains)] == ["b1", "r1", "b2", "r2"]
    stuck = {"a": [Job("a1", "train", None, "", after="nowhere")]}
    with pytest.raises(RetroError, match="'a1' waits for 'nowhere'"):
        one_after_another(stuck)


def test_an_unknown_retrofit_model_field_is_a_clear_error_before_any_work(tmp_path):
    from retro_jax.demo import run_demo
    from retro_jax.errors import RetroError

    config = _demo_config("smallest")
    config.demo.retrofit_model.cca_sinc = False
    with pytest.raises(RetroError, match=r"^demo.retrofit_model.cca_sinc: not a model config"):
        run_demo(config, str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w" / "prepare").exists()


def test_worker_exits_when_its_demo_process_is_killed():
    """_exit_with_parent: a demo worker does not outlive a SIGKILLed demo process."""
    script = (
        "import os, sys, time\n"
        "from retro_jax.demo import _exit_with_parent\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    _exit_with_parent()\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    ps = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert ps.returncode == -9, ps.stderr
    worker = int(ps.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(worker), f"worker {worker} outlived its parent"


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_summary_prints_the_low_overlap_difference_with_its_standard_error():
    from retro_jax.demo import format_summary

    row = {"alpha": 0.125, "chunks": 68, "retrieval_bpb": 1.5669, "no_retrieval_bpb": 1.5668}
    row.update(baseline_bpb=1.5631, retrieval_se=0.0049, no_retrieval_se=0.0031)
    summary = {
        "bpb": dict(baseline=0.761, retro=0.6554, retro_off=0.779, retrofit=0.6983),
        "bpb_alpha_1_8": dict(chunks=68, baseline=1.5631, retro=1.5669, retro_off=1.5668),
        "eval_tokens": 60597,
        "eval_bytes": 208711,
        "num_neighbours": 2,
        "leakage": [row],
        "leakage_plot": "W/retro/eval/leakage.png",
        "sample": {"prompt": "p", "text": "t", "neighbours": []},
        "seconds": {"prepare": 1.0},
    }
    summary["bpb"]["retrofit_off"] = 0.761
    before = format_summary(summary)  # a summary written before the standard errors: no line
    assert "standard error" not in before and "+0.0038 +- 0.0049" in before
    summary["bpb_alpha_1_8"].update(retro_se=0.0049, retro_off_se=0.0031)
    text = format_summary(summary)
    assert "RETRO - baseline at alpha<=1/8: +0.0038 bpb, one standard error over" in text
    assert "those chunks 0.0049" in text
