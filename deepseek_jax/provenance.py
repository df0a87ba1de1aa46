"""Where a number came from: the machine, the software versions, the code revision (with a dirty flag), the load,
the command, the date; and the one writer of result files. Every benchmark, experiment and training run records
its provenance through this module, so every figure in README/BUILD.md/RESULTS.md names what produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Dict, Mapping, Optional

import jax
import jaxlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list:
    """The 1/5/15-minute load averages, rounded: results record them so a busy machine shows."""
    return [round(x, 2) for x in os.getloadavg()]


def git_rev(root: Optional[str] = REPO_ROOT, dirty: bool = True) -> str:
    """Short HEAD of the checkout at ``root`` (default: the one holding this package), plus "+dirty" when
    ``dirty`` and tracked files have uncommitted changes; "unknown" outside git."""
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
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(argv=None) -> str:
    """The command that is running, as a reader would retype it (``python -m pkg.mod args`` for modules)."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", argv[0]]
    return " ".join(shlex.quote(a) for a in head + argv[1:])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine(load_before=None, load_after=None, **extra) -> Dict[str, Any]:
    """The machine record: CPU, cores, platform, python, jax/jaxlib, backend and devices, XLA_FLAGS, the load
    averages before/after (when given), and ``extra`` (e.g. torch and transformers versions)."""
    rec = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    if load_before is not None:
        rec["load_before"] = load_before
    if load_after is not None:
        rec["load_after"] = load_after
    return {**rec, **extra}


def machine_lines(m: Mapping[str, Any], note: Optional[str] = None) -> list:
    """The two markdown bullets a result file gives its machine; ``note`` follows the load averages (default: a
    warning when either load average exceeded 1)."""
    lb, la = m.get("load_before", [0.0]), m.get("load_after", [0.0])
    if note is None:
        note = " (shared machine: other jobs were running, timings are noisy)" if max(lb[0], la[0]) > 1.0 else ""
    return [f"- machine: {m['cpu']}, {m['cores']} cores; load average before {lb}, after {la}{note}",
            f"- jax {m['jax']}, jaxlib {m['jaxlib']}, python {m['python']}, backend {m['backend']}, "
            f"XLA_FLAGS={m['XLA_FLAGS']!r}"]


def write_result_files(stem: str, data: dict, md: str, indent: int = 1) -> None:
    """A benchmark's or experiment's result as ``stem.json`` (``data``) and ``stem.md`` (``md``), creating the
    folder; prints what it wrote. The one writer behind benchmarks/results and experiments/results."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=indent, default=str)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(f"wrote {stem}.{{json,md}}")
