"""A run killed, preempted or interrupted after a checkpoint resumes to the same losses."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST_COMPILE_ENV
from test_pipeline import write_fake_prepare
from test_train_step import small_config

from retro_jax.train.loop import train
from retro_jax.train.metrics import read_metrics

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from test_train_step import small_config


def get_config(arg=""):
    return small_config(steps={steps}, checkpoint_every={every}, log_every=1, eval_every=0,
                        keep_checkpoints=2, shuffle_buffer=8)
"""


def launch(config_path, workdir, cache):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=cache,  # the three runs compile the same programs once
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        **FAST_COMPILE_ENV,  # 24 small steps a run: the compiles cost more than the steps
    )
    command = [
        sys.executable,
        "-m",
        "retro_jax.cli",
        "train",
        f"--config={config_path}",
        f"--workdir={workdir}",
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(path, process, timeout=240):
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


@pytest.mark.slow
def test_killed_preempted_and_interrupted_runs_resume_to_the_uninterrupted_losses(tmp_path):
    """One run stopped three ways, each after a checkpoint, and rerun each time: SIGKILL (no
    warning), SIGTERM (preemption: a checkpoint at the step reached, a clean exit) and SIGINT
    (Ctrl-C: the same, with a message first). Its losses and gradient norms are the uninterrupted
    run's at every step."""
    steps, every = 24, 4
    config_path = tmp_path / "config.py"
    config_path.write_text(CONFIG.format(tests=TESTS, steps=steps, every=every))
    cache = str(tmp_path / "jax_cache")
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for workdir in (reference, interrupted):
        write_fake_prepare(workdir, train_files=3, records_per_file=12)

    finish(launch(config_path, reference, cache))
    expected = {row["step"]: row for row in read_metrics(str(reference))}
    assert sorted(expected) == list(range(1, steps + 1))

    process = launch(config_path, interrupted, cache)
    wait_for(interrupted / "checkpoints" / str(every), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_rows = read_metrics(str(interrupted))
    assert killed_rows and killed_rows[-1]["step"] < steps

    # SIGTERM (preemption) in the resumed run, after its first new checkpoint.
    process = launch(config_path, interrupted, cache)
    wait_for(interrupted / "checkpoints" / str(2 * every), process)
    process.send_signal(signal.SIGTERM)
    out = finish(process)
    assert "resuming from step" in out
    stopped = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert stopped < steps and (interrupted / "checkpoints" / str(stopped)).exists()
    assert read_metrics(str(interrupted))[-1]["step"] == stopped

    # Ctrl-C (SIGINT) in the next one.
    later = (stopped // every + 1) * every
    assert later < steps
    process = launch(config_path, interrupted, cache)
    wait_for(interrupted / "checkpoints" / str(later), process)
    process.send_signal(signal.SIGINT)
    out = finish(process)
    assert "Ctrl-C: saving a checkpoint after this step" in out
    stopped = int(out.split("SIGINT at step ")[1].split(":")[0])
    assert stopped < steps and (interrupted / "checkpoints" / str(stopped)).exists()

    finish(launch(config_path, interrupted, cache))
    resumed = {row["step"]: row for row in read_metrics(str(interrupted))}
    assert sorted(resumed) == list(range(1, steps + 1))  # rows after each checkpoint rewritten
    for step in range(1, steps + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step

    again = train(
        small_config(steps=steps, checkpoint_every=every, shuffle_buffer=8), str(interrupted)
    )
    assert again["finished"] and again["step"] == steps
    kept = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == steps and len(kept) == 2  # keep_checkpoints=2


def test_resume_allows_changes_of_compute_and_init_only_fields():
    """dtype, remat, scan_layers, logits_chunk and cca_zero_init do not change the weights: a
    checkpoint resumes under other values (or from before cca_zero_init was recorded); a field
    that shapes the weights is named."""
    from retro_jax.errors import RetroError
    from retro_jax.model import RetroConfig
    from retro_jax.train.checkpoint import check_resumable

    saved = RetroConfig().to_dict()
    del saved["cca_zero_init"]  # a checkpoint written before the field existed
    current = RetroConfig(dtype="bfloat16", remat=True, scan_layers=True, cca_zero_init=False)
    check_resumable("/ckpt", 5, {"model": saved}, {"model": current.to_dict()})
    with pytest.raises(RetroError, match=r"/ckpt/5 it would resume: model.d_model: checkpoint 64"):
        narrower = current.replace(d_model=32).to_dict()
        check_resumable("/ckpt", 5, {"model": saved}, {"model": narrower})
