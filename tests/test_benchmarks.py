"""The GPU check's script (benchmarks/bench_model_step.py, run by benchmarks/gpu_check.sh on a
device machine with no TensorFlow) works end to end at tiny sizes: a broken import or API there
would waste the device's time."""

import json
import os
import subprocess
import sys

from conftest import FAST_COMPILE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_step_benchmark_and_its_sharded_check_run():
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_model_step.py"),
        *("--presets", "tiny", "--seq-len", "64", "--batch", "2", "--steps", "2"),
        *("--peak-size", "256", "--vocab-sizes", "4096,256", "--check"),
    ]
    # A check that the benchmark runs and reports sane fields, not a timing: compiled fast.
    env = dict(os.environ, PYTHONPATH=ROOT, **FAST_COMPILE_ENV)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    # One row per vocabulary, each the tiny preset with that vocabulary.
    assert list(result["models"]) == ["tiny, vocabulary 4,096", "tiny, vocabulary 256"]
    big, small = result["models"].values()
    assert (big["vocab_size"], small["vocab_size"]) == (4096, 256)
    for tiny in (big, small):
        for name in ("baseline", "retro"):
            assert tiny[name]["step_s"] > 0 and 0 < tiny[name]["mfu"] < 1, tiny[name]
        assert tiny["retro"]["flops_per_token"] > tiny["baseline"]["flops_per_token"]
        # The models' steps are interleaved, one of each per round, and compared round by round.
        assert len(tiny["retro"]["step_times_s"]) == len(tiny["baseline"]["step_times_s"]) == 2
        by_round = tiny["retro_mfu_over_baseline_mfu_by_round"]
        assert 0 < by_round["min"] <= by_round["median"] <= by_round["max"], by_round
    # The head's share of the baseline's FLOPs: 6 d V of flops_per_token, larger with V.
    head = 6 * 64 * 4096 / big["baseline"]["flops_per_token"]
    assert abs(big["head_share_of_baseline_flops"] - head) < 1e-12
    assert 0 < small["head_share_of_baseline_flops"] < big["head_share_of_baseline_flops"] < 1
    assert result["sharded_check"]["equal"] is True, result["sharded_check"]
    bad = subprocess.run([*command[:2], "--vocab-sizes", "32000,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--vocab-sizes" in bad.stderr.splitlines()[-1], bad.stderr


def test_matmul_benchmark_times_the_products_it_names():
    """benchmarks/bench_matmul.py (#19's XLA-against-PyTorch reproduction): each product, as JAX
    runs it and as the PyTorch side's views would, is the same product, with the FLOPs counted."""
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_matmul import flops, matmul_operands, products

    rng = np.random.default_rng(0)
    plist = products(scale=16)
    assert len(plist) == 5 * 4 + 6 and len({p["name"] for p in plist}) == len(plist)
    demo = products(scale=16, shapes="demo")
    assert len(demo) == 8 * 4 + 6 and sum(p["per_step"] == 0 for p in demo) == 8
    for p in plist + demo:
        a = rng.standard_normal(p["a"]).astype(np.float32)
        b = rng.standard_normal(p["b"]).astype(np.float32)
        batch = ((0,), (0,)) if p["batch"] else ((), ())
        contract = ((p["contract"][0],), (p["contract"][1],))
        want = np.asarray(jax.lax.dot_general(a, b, (contract, batch)))
        left, right = matmul_operands(a, b, p["contract"], lambda x: np.swapaxes(x, -1, -2))
        np.testing.assert_allclose(left @ right, want, rtol=1e-4, atol=1e-3, err_msg=p["name"])
        assert flops(p) == 2 * want.size * a.shape[p["contract"][0]], p["name"]
    script = os.path.join(ROOT, "benchmarks", "bench_matmul.py")
    quick = [sys.executable, script, "--scale", "16", "--rounds", "1", "--repeats", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT, RETRO_JAX_TORCH_PYTHON="")
    done = subprocess.run(quick, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert [r["name"] for r in result["products"]] == [p["name"] for p in plist]
    assert all(r["jax_gflops"] > 0 for r in result["products"])
    assert result["jax_step_products_s"] > 0 and "torch_step_products_s" not in result
    bad = subprocess.run(
        [*quick, "--torch-python", "/nowhere/python"], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--torch-python /nowhere/python" in bad.stderr


def test_matmul_benchmarks_172m_shapes_are_the_peer_models():
    """bench_matmul's 172m products (written out for its PyTorch child) are the model that
    bench_model_step --peer-shapes times against RETRO-pytorch, which builds 8 heads of 64
    whatever its harness asks: the two once differed (16 heads) and compared unlike models."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_matmul import SHAPES
    from bench_model_step import PEER_SHAPES

    peer, shapes = PEER_SHAPES["172m"], SHAPES["172m"]
    assert (shapes["d"], shapes["ff"], shapes["layers"], shapes["vocab"]) == (
        peer["d_model"],
        peer["d_ff"],
        peer["num_layers"],
        peer["vocab_size"],
    )
    assert (shapes["heads"], shapes["head_dim"]) == (peer["num_heads"], peer["head_dim"]) == (8, 64)
    assert PEER_SHAPES["small"]["num_heads"] == peer["enc_num_heads"] == 8


def test_matmul_benchmarks_demo_shapes_are_the_demos():
    """bench_matmul's `--shapes demo` is written out (its PyTorch child has no retro_jax to read
    the config with): it must stay experiments/demo.py's model."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import demo
    from bench_matmul import DEMO_ENCODER, SHAPES

    config = demo.get_config("")
    m, shapes = config.model, SHAPES["demo"]
    assert (shapes["seq"], shapes["batch"]) == (config.data.seq_len, config.train.batch_size)
    assert (shapes["d"], shapes["ff"], shapes["layers"]) == (m.d_model, m.d_ff, m.num_layers)
    assert (shapes["heads"], shapes["head_dim"], shapes["vocab"]) == (
        m.num_heads,
        m.head_dim,
        m.vocab_size,
    )
    assert (DEMO_ENCODER["d"], DEMO_ENCODER["ff"]) == (m.enc_d_model, m.enc_d_ff)
    assert DEMO_ENCODER["layers"] == m.enc_num_layers
    assert DEMO_ENCODER["tokens_per_token"] == config.train.num_neighbours * 2  # k x 2m per m


def test_core_scaling_benchmark_pins_one_child_to_one_cpu():
    """benchmarks/bench_core_scaling.py (#19: how well each piece of the step uses the cores)
    times every piece in a child on all CPUs and in one pinned to a single CPU."""
    script = os.path.join(ROOT, "benchmarks", "bench_core_scaling.py")
    env = dict(os.environ, PYTHONPATH=ROOT, **FAST_COMPILE_ENV)
    done = subprocess.run(
        [sys.executable, script, "--quick", "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_core_scaling import NAMES

    assert list(result["pieces"]) == list(NAMES)
    for name, row in result["pieces"].items():
        assert row["all_cpus_s"] > 0 and row["one_cpu_s"] > 0, name
        assert row["speedup"] == row["one_cpu_s"] / row["all_cpus_s"], name
        assert 0 < row["one_cpu_cores_busy"] < 1.1, (name, row)  # one CPU: never two busy
