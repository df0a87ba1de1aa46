"""Run metrics: bits per byte, and writers (JSON lines + TensorBoard event files)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def loadavg() -> list:
    """The 1/5/15-minute load averages, rounded: benchmarks record them so a busy machine shows in the results."""
    import os
    return [round(x, 2) for x in os.getloadavg()]


def git_rev(root=None, dirty: bool = True) -> str:
    """Short HEAD of the checkout at ``root`` (default: the current directory), plus "+dirty" when ``dirty`` and
    tracked files have uncommitted changes; "unknown" outside git. Every result names the code it measured."""
    import subprocess
    git = ["git"] + (["-C", str(root)] if root else [])
    try:
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return "unknown"
        if dirty and subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=5).stdout.strip():
            rev += "+dirty"
        return rev
    except Exception:
        return "unknown"


def time_calls(fn, reps: int, warmup: int = 1) -> list:
    """Wall seconds of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones, each call waited for
    (``jax.block_until_ready`` on its result; torch results pass through). The benchmarks' one timing loop."""
    import time

    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return ts


def bench_machine(load_before, load_after, **extra) -> dict:
    """The machine record of a benchmark result: CPU, cores, platform, python, jax/jaxlib, the load averages
    before and after the run, ``extra`` (e.g. torch and transformers versions) and XLA_FLAGS."""
    import platform

    import jax
    import jaxlib
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_before": load_before, "load_after": load_after,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, **extra,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def machine_lines(machine: Mapping[str, Any], note=None) -> list:
    """The two markdown bullets a result file gives its machine; ``note`` follows the load averages (default:
    a warning when either load average exceeded 1)."""
    lb, la = machine["load_before"], machine["load_after"]
    if note is None:
        note = " (shared machine: other jobs were running, timings are noisy)" if max(lb[0], la[0]) > 1.0 else ""
    return [f"- machine: {machine['cpu']}, {machine['cores']} cores; load average before {lb}, after {la}{note}",
            f"- jax {machine['jax']}, jaxlib {machine['jaxlib']}, python {machine['python']}, "
            f"XLA_FLAGS={machine['XLA_FLAGS']!r}"]


def write_result_files(stem: str, data: dict, md: str, indent: int = 1) -> None:
    """A benchmark's or experiment's result as ``stem.json`` (``data``) and ``stem.md`` (``md``), creating the
    folder; prints what it wrote. The one writer behind experiments/results/*.{json,md}."""
    import json
    import os
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=indent, default=str)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(f"wrote {stem}.{{json,md}}")


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
