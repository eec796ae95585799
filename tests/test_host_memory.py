"""keep_freed_memory: after the first run, a jitted program's temporaries cost no page faults.

Each case runs in a fresh interpreter (the setting must come before JAX starts its threads): a
program with 64 MiB temporaries runs three times to warm up, then seven times while the process
counts each run's minor page faults, which are compared with the temporaries' size as XLA reports
it. The kept heap may still grow now and then while it settles (a run that faults), so the
property is that runs without faults happen at all, where with malloc as it comes none does.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, os, resource, sys, threading, time
mode = sys.argv[1]
if mode == "thread_first":  # a thread that allocates before malloc is configured
    threading.Thread(target=lambda: [time.sleep(0.5) for _ in iter(int, 1)], daemon=True).start()
    time.sleep(0.1)
from retro_jax.host_memory import keep_freed_memory
if mode == "worker":  # as a demo chain's process starts
    from retro_jax.demo import start_worker
    start_worker(os.sched_getaffinity(0))
    applied = True
else:
    applied = keep_freed_memory() if mode in ("keep", "thread_first") else False
import jax, jax.numpy as jnp

@jax.jit
def f(u, v):  # [4096, 4096] float32 products (64 MiB each) between [4096, 32] operands
    for _ in range(3):
        u = jnp.dot(jnp.sin(jnp.dot(u, v)), v.T) / 64
    return u

u = jnp.ones((4096, 32), jnp.float32)
v = jnp.full((32, 4096), 0.01, jnp.float32)
temp_bytes = f.lower(u, v).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
    f(u, v).block_until_ready()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(u, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "temp_bytes": temp_bytes}))
"""


def run(mode: str) -> dict:
    env = {**os.environ, "RETRO_JAX_KEEP_FREED_MEMORY": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory configures glibc malloc only",
)
def test_freed_memory_is_reused_without_page_faults():
    default, kept = run("default"), run("keep")
    assert kept["applied"] and not default["applied"]
    pages = default["temp_bytes"] / 4096
    assert pages >= 64 * 2**20 / 4096, default
    # The premise: with malloc as it comes, every run faults its temporaries in again.
    assert min(default["faults"]) > 0.5 * pages, default
    # Kept: the heap already holds them, in two runs at least.
    assert sorted(kept["faults"])[1] < 0.05 * pages, kept


def test_opt_out_leaves_malloc_alone(monkeypatch):
    from retro_jax.host_memory import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory configures glibc malloc only",
)
def test_it_must_come_before_other_threads_and_demo_workers_apply_it_so():
    late, worker = run("thread_first"), run("worker")
    pages = worker["temp_bytes"] / 4096
    # A thread that allocated first keeps its arena, which JAX's threads may then share,
    # bypassing the kept heap (in a demo worker's RETRO step: 8x the page faults, 0.27 s of
    # system time a step, retro_jax/host_memory.py); the call says so.
    assert late["applied"] and "already run" in late["stderr"]
    # A demo chain's process (retro_jax/demo.start_worker, which starts a watcher thread) keeps
    # malloc first.
    assert sorted(worker["faults"])[1] < 0.05 * pages, worker
    assert "already run" not in worker["stderr"]
