"""Redundant experts (V3 §3.4): from measured per-expert loads, place E experts plus R replicas on G devices so
that the most-loaded device carries as little as possible. The paper's prefill deployment puts 256 experts + 32
redundant ones on 32 GPUs (9 per GPU), chosen from load statistics gathered online and refreshed periodically.

Model of the load: expert e with r_e copies sends load_e / r_e of its tokens to each copy (the router's tokens
for e are split evenly across its copies, as a dispatcher would round-robin them); a device's load is the sum
over the copies it holds. Every device holds exactly S = (E + R) / G copies (same memory everywhere), never two
copies of one expert.

Algorithm (greedy, two steps, like DeepSeek's EPLB):
  1. replicate: R times, give one more copy to the expert with the largest per-copy load load_e / r_e, at most G
     copies each (this minimises the largest per-copy load, a lower bound on the best max device load);
  2. pack: copies in decreasing per-copy load, each onto the least-loaded device that still has a free slot and
     does not hold that expert yet (longest-processing-time first with slot limits).
The baseline is the expert-parallel layout without replicas: expert e on device e // (E / G)
(``ops/expert_parallel.py``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _check(loads, n_redundant: int, n_devices: int) -> np.ndarray:
    loads = np.asarray(loads, np.float64)
    if loads.ndim != 1 or loads.size == 0:
        raise ValueError(f"loads: expected a non-empty 1-D array of per-expert loads, got shape {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise ValueError("loads: must be finite and non-negative")
    E = loads.size
    if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"n_devices: must be a positive int, got {n_devices!r}")
    if not isinstance(n_redundant, (int, np.integer)) or n_redundant < 0:
        raise ValueError(f"n_redundant: must be a non-negative int, got {n_redundant!r}")
    if (E + n_redundant) % n_devices:
        raise ValueError(f"n_experts + n_redundant = {E + n_redundant} must be divisible by n_devices={n_devices} "
                         "(every device holds the same number of experts)")
    if (E + n_redundant) // n_devices > E:
        raise ValueError("more slots per device than experts: a device would have to hold one expert twice")
    return loads


def replicate(loads, n_redundant: int, max_copies: int) -> np.ndarray:
    """Copies per expert (>= 1, <= max_copies, summing to E + R): each extra copy goes to the largest per-copy
    load among the experts that may still get one (a device never holds two copies, so max_copies = G)."""
    loads = np.asarray(loads, np.float64)
    copies = np.ones(loads.size, np.int64)
    if n_redundant > loads.size * (max_copies - 1):
        raise ValueError(f"n_redundant={n_redundant}: at most {max_copies} copies of each of {loads.size} experts")
    for _ in range(n_redundant):
        per_copy = np.where(copies < max_copies, loads / copies, -np.inf)
        copies[int(np.argmax(per_copy))] += 1  # ties: lowest index
    return copies


def place(loads, n_redundant: int, n_devices: int) -> List[List[int]]:
    """Experts held by each device (a list of G lists of S expert ids) for the greedy placement."""
    loads = _check(loads, n_redundant, n_devices)
    E = loads.size
    slots = (E + n_redundant) // n_devices
    copies = replicate(loads, n_redundant, n_devices)
    items = sorted(((loads[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
                   key=lambda t: (-t[0], t[1]))
    held: List[List[int]] = [[] for _ in range(n_devices)]
    dev_load = np.zeros(n_devices)
    for w, e in items:
        ok = [g for g in range(n_devices) if len(held[g]) < slots and e not in held[g]]
        if not ok:  # cannot happen for copies <= n_devices with LPT order, but say so rather than loop
            raise RuntimeError(f"placement: no device left for a copy of expert {e}")
        g = min(ok, key=lambda g: (dev_load[g], len(held[g]), g))
        held[g].append(e)
        dev_load[g] += w
    return held


def device_loads(loads, placement: Sequence[Sequence[int]]) -> np.ndarray:
    """Per-device load for a placement, each expert's load split evenly over its copies."""
    loads = np.asarray(loads, np.float64)
    copies = np.zeros(loads.size, np.int64)
    for dev in placement:
        for e in dev:
            copies[e] += 1
    if np.any(copies == 0):
        raise ValueError(f"placement: experts {np.flatnonzero(copies == 0).tolist()} are on no device")
    return np.array([sum(loads[e] / copies[e] for e in dev) for dev in placement])


def contiguous(n_experts: int, n_devices: int) -> List[List[int]]:
    """The expert-parallel layout without replicas: expert e on device e // (E / G)."""
    if n_experts % n_devices:
        raise ValueError(f"n_experts={n_experts} is not divisible by n_devices={n_devices}")
    per = n_experts // n_devices
    return [list(range(g * per, (g + 1) * per)) for g in range(n_devices)]


def imbalance(dev_loads) -> float:
    """max device load / mean device load (1.0 = perfectly balanced)."""
    dev_loads = np.asarray(dev_loads, np.float64)
    m = dev_loads.mean()
    return float(dev_loads.max() / m) if m > 0 else 1.0


def evaluate(fit_loads, eval_loads, n_redundant: int, n_devices: int) -> Dict[str, float]:
    """Place from ``fit_loads``, measure on ``eval_loads`` (the same, or a later batch's): the imbalance of the
    contiguous layout and of the greedy placement."""
    fit_loads = np.asarray(fit_loads, np.float64)
    placement = place(fit_loads, n_redundant, n_devices)
    base = device_loads(eval_loads, contiguous(fit_loads.size, n_devices))
    return {"before": imbalance(base), "after": imbalance(device_loads(eval_loads, placement))}
