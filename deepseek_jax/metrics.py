"""Run metrics: bits per byte, and writers (JSON lines + TensorBoard event files). Provenance (machine, code
revision) and result files are ``provenance.py``."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping

import numpy as np


def bits_per_byte(ce_sum_nats: float, n_bytes: float) -> float:
    """Total cross-entropy (nats, summed over predicted tokens) / (ln 2 * bytes those tokens represent): the
    paper's Pile metric, comparable across tokenizers."""
    if n_bytes <= 0:
        return float("nan")
    return float(ce_sum_nats) / (math.log(2) * float(n_bytes))


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size == 1:
            out[k] = float(a.reshape(()))
    return out


def _jsonable(v):
    a = np.asarray(v)
    return float(a.reshape(())) if a.size == 1 else a.tolist()


class MetricsWriter:
    """Appends one JSON object per call to ``<dir>/<name>.jsonl`` and writes scalars to TensorBoard events in
    ``<dir>/tb``. Array-valued metrics (e.g. per-layer expert loads) go to the JSONL only."""

    def __init__(self, directory: str, name: str = "metrics", tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{name}.jsonl")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tb"), flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        rec = {"step": int(step), **{f"{prefix}{k}": _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in _scalars(metrics).items():
                self._tb.add_scalar(f"{prefix}{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonl_torn(path: str):
    """read_jsonl that drops a torn final line (a run killed in the middle of writing it); a bad line elsewhere
    is corruption: ValueError naming the file and line."""
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an int step")
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics record ({type(e).__name__})") from None
        out.append(rec)
    return out


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drop records with step > max_step (a resumed run rewinds to its checkpoint, so lines written after that
    checkpoint would otherwise appear twice), and a torn final line."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_jsonl_torn(path) if r["step"] <= max_step]
    with open(path, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
