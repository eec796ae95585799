"""The GPU check's script (benchmarks/bench_model_step.py, run by benchmarks/gpu_check.sh on a
device machine with no TensorFlow) works end to end at tiny sizes: a broken import or API there
would waste the device's time."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_step_benchmark_and_its_sharded_check_run():
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_model_step.py"),
        *("--presets", "tiny", "--seq-len", "64", "--batch", "2", "--steps", "1"),
        *("--peak-size", "256", "--check"),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    tiny = result["models"]["tiny"]
    for name in ("baseline", "retro"):
        assert tiny[name]["step_s"] > 0 and 0 < tiny[name]["mfu"] < 1, tiny[name]
    assert tiny["retro"]["flops_per_token"] > tiny["baseline"]["flops_per_token"]
    assert result["sharded_check"]["equal"] is True, result["sharded_check"]
