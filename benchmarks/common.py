"""What every speed benchmark shares: the one timing loop."""

from __future__ import annotations

import time

import jax


def time_calls(fn, reps: int, warmup: int = 1) -> list:
    """Wall seconds of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones, each call waited for
    (``jax.block_until_ready`` on its result; torch results pass through)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return ts
