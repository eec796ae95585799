"""Test harness: 8 fake CPU devices, set before jax is imported anywhere."""

import os

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
