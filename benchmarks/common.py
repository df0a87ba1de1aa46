"""What every speed benchmark shares: the one timing loop."""

from __future__ import annotations

import time


def time_calls(fn, reps: int, warmup: int = 1, sync=None) -> list:
    """Wall seconds of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones, each call waited for with
    ``sync(result)`` (default ``jax.block_until_ready``, through which torch results pass; a torch-only process
    passes its own ``sync``, e.g. ``lambda r: r`` for CPU tensors, and never imports jax)."""
    if sync is None:
        import jax
        sync = jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return ts
