"""Shared by the FP8 experiment scripts: where results go and the provenance every results file records."""

from __future__ import annotations

import json
import os

from deepseek_jax import provenance as provenance_lib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp8")


def provenance() -> dict:
    return {"command": provenance_lib.command_line(), **provenance_lib.machine(),
            "code_version": provenance_lib.git_rev(dirty=True), "date_utc": provenance_lib.utc_now()}


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
