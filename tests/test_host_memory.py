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
import json, resource, sys
from retro_jax.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
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
    return json.loads(out.stdout.strip().splitlines()[-1])


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
