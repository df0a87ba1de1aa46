"""Shared by the FP8 experiment scripts: where results go and the provenance every results file records."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp8")


def provenance() -> dict:
    from deepseek_jax.metrics import cpu_model, git_rev
    code = git_rev(os.path.dirname(RESULTS), dirty=False)
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "code_version": code, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(name: str, obj: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    return path


def write_text(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def provenance_md(p: dict) -> str:
    return (f"Command: `{p['command']}`  \nMachine: {p['cpu']} ({p['cores']} cores), backend {p['backend']}, "
            f"jax {p['jax']}, code {p['code_version']}, {p['date_utc']}\n")
