"""Where a compiled XLA:CPU program's time goes: a per-op breakdown from JAX's profiler.

`op_breakdown(compiled, run, reps)` runs `run()` (which must call `compiled` once and block) `reps` times under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`), and sums the duration of every thunk the
XLA:CPU runtime executed, by HLO instruction. Container thunks (while / conditional / call) are skipped: the
thunks of their bodies are recorded on their own, so nothing is counted twice. Each HLO instruction is mapped to
the JAX source op that produced it through the compiled module's `metadata={op_name=...}`, whose path carries
the Flax module names (`Transformer/moe_layers/mlp/...`), and `jvp(...)` / `transpose(...)` mark forward and
backward. `group_of` turns that path into a coarse group (attention, routed experts, head, optimizer, ...).

    python -m benchmarks.bench_train --profile    # the train step's breakdown at the benchmark shape
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, List

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+.*?\s(\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = ("while", "conditional", "call")


def hlo_op_names(hlo_text: str) -> Dict[str, tuple]:
    """HLO instruction name -> (opcode, JAX op_name metadata or '') for every instruction of the module."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op = _OP_NAME.search(line)
        out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def _strip(op_name: str) -> str:
    """'jit(train_step)/while/body/closed_call/transpose(jvp(Transformer))/lm_head/dot_general' ->
    'bwd Transformer/lm_head/dot_general' (fwd / bwd / '' outside the model)."""
    direction = "bwd " if "transpose(" in op_name else ("fwd " if "jvp(" in op_name else "")
    parts = [p for p in op_name.split("/") if p not in ("while", "body", "closed_call", "cond")
             and not p.startswith("jit(") and not p.startswith("checkpoint")]
    parts = [re.sub(r"^(?:transpose\()?(?:jvp\()?([^()]*)\)*$", r"\1", p) for p in parts]
    return direction + "/".join(parts)


# (pattern on the stripped op path, group): first match wins
GROUPS = (
    (r"^\S+ (?:Transformer/)?mtp_", "MTP module"),
    (r"/mlp/router", "router"),
    (r"/mlp/shared_experts", "shared experts"),
    (r"moe_layers\w*/mlp", "routed experts (dispatch + expert FFN)"),
    (r"dense_layers\w*/mlp", "dense FFN"),
    (r"/attn(?:/|$)", "attention (MLA projections + core)"),
    (r"lm_head|final_norm", "output head"),
    (r"/embed", "embedding"),
    (r"_norm", "norms"),
    (r"^(?:fwd|bwd) ", "model (other: loss, layer plumbing)"),
    (r"", "optimizer, clipping, bias update, step bookkeeping"),
)


def group_of(path: str) -> str:
    for pat, name in GROUPS:
        if re.search(pat, path):
            return name
    return "other"


def op_breakdown(compiled, run: Callable[[], None], reps: int = 3) -> List[dict]:
    """Per-HLO-instruction time per call of ``run``, sorted by time: dicts with hlo, opcode, path, group, ms,
    calls (thunk executions per run)."""
    import jax
    names = hlo_op_names(compiled.as_text())
    d = tempfile.mkdtemp(prefix="xla_profile_")
    try:
        with jax.profiler.trace(d):
            for _ in range(reps):
                run()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {d}")
        data = jax.profiler.ProfileData.from_file(files[0])
        total = collections.Counter()
        calls = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name not in names or names[ev.name][0] in _CONTAINERS:
                        continue
                    total[ev.name] += ev.duration_ns
                    calls[ev.name] += 1
    finally:
        shutil.rmtree(d, ignore_errors=True)
    rows = []
    for hlo, ns in total.items():
        path = _strip(names[hlo][1])
        rows.append({"hlo": hlo, "opcode": names[hlo][0], "path": path, "group": group_of(path),
                     "ms": ns / reps / 1e6, "calls": calls[hlo] / reps})
    rows.sort(key=lambda r: -r["ms"])
    return rows


def by_group(rows: List[dict]) -> List[tuple]:
    """(group, fwd ms, bwd ms, other ms, total ms) per group, sorted by total."""
    agg = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        k = 0 if r["path"].startswith("fwd ") else (1 if r["path"].startswith("bwd ") else 2)
        agg[r["group"]][k] += r["ms"]
    out = [(g, *v, sum(v)) for g, v in agg.items()]
    out.sort(key=lambda t: -t[-1])
    return out
