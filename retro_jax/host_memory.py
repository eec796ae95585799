"""Keep the host memory that XLA:CPU frees, so the next step reuses it instead of faulting it in.

XLA:CPU allocates each execution's temporary buffers with malloc (one block of the program's
peak: about 1 GB for the small model's train step, several for the 172m preset) and frees them when
the step ends. glibc serves a block that large with a fresh mmap, even with its mmap threshold
raised, when the asking thread is not the main one, and unmaps it on free: every step the kernel
faults in and zeroes every page again. Measured on a 2-core machine (benchmarks/results/model.md),
that was 30% of the 172m train step, all of it in the kernel.

`keep_freed_memory()` tells glibc to serve every thread from the one main heap, to never use mmap
for a block and never hand freed memory back: after the first step the heap holds the program's
peak and later steps reuse it with no page faults. The price is that the process keeps its peak
resident until it exits, which a training or evaluation process does anyway. It must run before
JAX starts its threads (before the first computation), and before any other thread: a thread
that has already allocated holds an arena of its own, which glibc then hands to the threads JAX
starts, and their temporaries fault in again every step as before (measured in a demo training
process whose watcher thread started first: 122,000 faults and 0.27 s of system time per RETRO
step against 15,000 and 0.04 s, the step 1.06 s against 0.92 s). It warns when other Python
threads already run (idle native ones, such as OpenBLAS's, measured harmless). The `retro-jax`
command and the benchmarks call it first thing. It slows XLA's compiles (by about a third in the
compile-bound tests, benchmarks/results/model.md), so the test suite does not apply it in its
own process.
Set RETRO_JAX_KEEP_FREED_MEMORY=0 to leave malloc alone.
On anything but Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings

ENV = "RETRO_JAX_KEEP_FREED_MEMORY"

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Configure glibc malloc as above; True if it applied (False: not glibc, or opted out)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    if threading.active_count() > 1:
        warnings.warn(
            f"keep_freed_memory: {threading.active_count() - 1} Python thread(s) already run; "
            "their malloc arenas stay in use, so freed memory may still go back to the kernel "
            "(call it before starting threads)",
            stacklevel=2,
        )
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A trim threshold of -1 becomes SIZE_MAX inside glibc: the heap is never trimmed.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
