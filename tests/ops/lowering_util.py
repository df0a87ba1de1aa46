"""Cross-lowering helpers for the FP8 kernel tests: export a function for an accelerator on this CPU machine and
read the custom calls out of the lowered StableHLO (so a silent fallback to XLA cannot pass)."""

import contextlib
import re

import jax
from jax import export

from deepseek_jax import compat

TRITON = "__gpu$xla.gpu.triton"
MOSAIC_TPU = "tpu_custom_call"
MOSAIC_GPU = "mosaic_gpu_v2"
TARGETS = (TRITON, MOSAIC_TPU, MOSAIC_GPU)


def export_text(fn, args, platform: str, mesh_context: bool = True) -> str:
    """StableHLO text of ``jax.export`` of ``jax.jit(fn)`` for ``platform``. For cuda, an abstract Hopper device
    is in scope (jax 0.11's GPU Pallas lowerings read it) unless the caller provides its own mesh."""
    ctx = (jax.sharding.use_abstract_mesh(compat.gpu_lowering_mesh()) if platform == "cuda" and mesh_context
           else contextlib.nullcontext())
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)]  # Triton IR is not a stable serialization format
    with ctx:
        return export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(*args).mlir_module()


def count_calls(text: str, target: str) -> int:
    return len(re.findall(r"custom_call @" + re.escape(target) + r"\(", text))


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def calls_outside_manual(text: str, target: str) -> int:
    """Custom calls to ``target`` that are not lexically inside a ``shard_map`` region (Shardy's
    ``sdy.manual_computation``, or GSPMD's ``shmap_body`` functions). Conservative: a call in any other private
    function counts as outside."""
    outside, depth, manual, in_shmap_fn = 0, 0, [], False
    for line in text.splitlines():
        bare = _STRING.sub('""', line)
        if re.match(r"\s*func\.func", bare):
            in_shmap_fn = "@shmap_body" in bare
        if count_calls(line, target) and not manual and not in_shmap_fn:
            outside += 1
        if "sdy.manual_computation" in bare:
            manual.append(depth)
        depth += bare.count("{") - bare.count("}")
        while manual and depth <= manual[-1]:
            manual.pop()
    return outside
