"""Test harness: 8 fake CPU devices, set before jax is imported anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# No `retro_jax.host_memory.keep_freed_memory()` here, unlike the CLI: the suite is bound by XLA
# compiles, which it slows (tests/test_model_config.py: 105-108 s with it, 72-73 s without, on
# 2 cores); tests/test_host_memory.py checks it in processes of its own.

# One persistent XLA compilation cache for the whole run. pytest-xdist's workers and every process
# a test starts (the CLI, the demo's chains, Beam's workers) inherit the variable, so a program
# compiled in one process (BERT at each padded length, a small model's train step) is read back
# in the others instead of compiled again. The process that creates it (the xdist controller, or
# pytest without xdist) removes it at the end; a cache the caller set is left alone.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="retro_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# Every program, not only those that took a second or more to compile (JAX's default): most of
# the suite's programs are small, and under `fast_compile` most compile in under a second. Its
# effect on the suite's time is within the noise of the 2-core machines (README).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Test files bound by XLA's compiles rather than by what their programs compute mark themselves
# `pytestmark = pytest.mark.fast_compile`: their programs compile with most optimizations off
# (`jax_disable_most_optimizations`: LLVM at -O0), which halves the compiles of tests/
# test_model_config.py and tests/test_decode.py and doubles the run time of a train step. JAX's
# in-memory caches are cleared when the setting changes, so no program compiled under one setting
# runs under the other (the persistent cache keys on it). The processes such a file starts get
# FAST_COMPILE_ENV.
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(request):
    import jax
    import jax._src.compiler  # noqa: F401  (defines the option)

    wanted = request.node.get_closest_marker("fast_compile") is not None
    if jax.config.values["jax_disable_most_optimizations"] != wanted:
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", wanted)
    yield


# The longest files first. `--dist loadscope` hands each file whole to whichever worker is free,
# in collection order; a long file handed out last keeps one worker busy while the other idles
# (2 minutes at the end of a run, on 2 cores, with the files in alphabetical order).
LONGEST_FIRST = (
    "test_prepare_beam",
    "test_demo",
    "test_model_sharding",
    "test_checkpoint_resume",
    "test_model_config",
    "test_retrieval_pays",
    "test_decode",
    "test_model_causality",
    "test_sample",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def file_rank(item) -> int:
        name = os.path.basename(item.nodeid.split("::")[0]).removesuffix(".py")
        return rank.get(name, len(rank))

    items.sort(key=file_rank)  # stable: each file's tests keep their order
