"""The host side of a step on XLA:CPU: keeping its memory in the process (BUILD.md "CPU speed").

XLA:CPU allocates a compiled program's temporary buffer afresh at every call: 77 MB for the experiments' base
model's train step, 489 MB at the benchmark shape. glibc's malloc serves a block that large with ``mmap`` and
returns it with ``munmap`` when it is freed, so at every step each of its pages faults in again and the kernel
zeroes it: on a 2-core machine a third of the base model's step went to the kernel that way. ``keep_freed_memory``
makes malloc serve every block from its heap and keep what is freed, so the next step reuses the same pages.

A worker thread's malloc arena caps its heaps at 64 MB and maps anything larger afresh whatever these settings
say, so the step must also run on the calling thread (its allocations come from the main heap):
``deepseek_jax.compat.use_cpu_settings`` turns off JAX's asynchronous CPU dispatch for that. Even so, on a loaded
machine an occasional call (about one in 30 with three busy processes on 2 cores) faults its temporaries in afresh;
``MALLOC_ARENA_MAX=1`` removed those in a short trial, but it is not applied: it made the base model's step about
half as slow again (XLA's pool threads then contend for one arena; the benchmark shape's step ~9% slower).

This module imports nothing but the standard library (the benchmark's torch worker applies the same malloc
settings to time transformers under them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: up to 2 GiB of freed memory at the top of the heap is kept
SETTINGS = "mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1)"  # what keep_freed_memory sets, as reports name it


def is_glibc() -> bool:
    """Whether this process's C library is glibc on Linux (the only one whose malloc these settings know)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """glibc only: ``mallopt(M_MMAP_MAX, 0)`` (never serve a block with mmap) and ``mallopt(M_TRIM_THRESHOLD,
    2**31 - 1)`` (never give the heap's freed top back to the system below 2 GiB), for the whole process. The
    process then keeps the memory of its largest step until it exits. True if both were set, False where the C
    library is not glibc (the call is then a no-op)."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
