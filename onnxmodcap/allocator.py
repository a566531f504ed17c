"""Freed memory stays in the process while a model is quantized (glibc's malloc on Linux).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free; smaller blocks come from the heap, whose free top is handed back to the kernel
above 128 KiB. At real resolution a training step frees and allocates dozens of activation tensors
of tens to hundreds of MB, so in every step the kernel zero-fills them again page by page: in
EfficientNet-Lite1's first six units at 240x240 (batch 32, 2 threads) 42-59 % of the process's CPU
time went to the kernel, and on one thread a depthwise 3x3 convolution's forward and backward on 32
images of 32 channels at 120x120 took 394 ms with freed memory handed back against 86 ms with it
kept (docs/benchmarks/reconstruct.md, "Allocation churn").

`retained_memory()` switches glibc to the heap only (no mapping per block), never trims it and
keeps one arena for every thread, and afterwards returns glibc's documented defaults and hands the
free heap back. What is freed stays mapped for reuse, so the resident memory stays at its
high-water mark until the run ends.
Nothing changes where the C library is not glibc or where the user tuned malloc through the
environment (MALLOC_* variables, GLIBC_TUNABLES, a preloaded allocator).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h) and glibc's documented defaults
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_MAX: 65536, M_ARENA_MAX: 0}
RETAINED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: 64 << 20, M_ARENA_MAX: 1}


def tuned_by_user() -> bool:
    return (any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ
            or "LD_PRELOAD" in os.environ)


def glibc_malloc() -> ctypes.CDLL | None:
    """The process's C library, where it is glibc and malloc is its own."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or tuned_by_user():
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def retained_memory() -> Iterator[None]:
    libc = glibc_malloc()
    if libc is None:
        yield
        return
    for parameter, value in RETAINED.items():
        libc.mallopt(parameter, value)
    try:
        yield
    finally:
        for parameter, value in GLIBC_DEFAULTS.items():
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)
