"""Everything that differs between the supported jax releases, in one place (BUILD.md "Tested stacks").

Callers use these names instead of probing jax themselves, so a new jax release means editing this file only.
"""

from __future__ import annotations

import contextlib

import jax

try:  # jax >= 0.7
    from jax import shard_map as _shard_map
    _CHECK_KW = "check_vma"
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map
    _CHECK_KW = "check_rep"


def shard_map(f, *, mesh, in_specs, out_specs, check: bool = True):
    """``jax.shard_map`` (jax >= 0.7; the check keyword is ``check_vma``) or
    ``jax.experimental.shard_map.shard_map`` (``check_rep``)."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_KW: check})


def abstract_mesh(axis_sizes, axis_names, **kwargs):
    """``jax.sharding.AbstractMesh``: jax >= 0.5 takes (axis_sizes, axis_names); older releases a tuple of
    (name, size) pairs. Axis types default to Auto (jax 0.11 made Explicit the default; this project's steps are
    written for Auto axes, as a concrete ``Mesh`` has them)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None and "axis_types" not in kwargs:
        kwargs["axis_types"] = (axis_type.Auto,) * len(tuple(axis_names))
    try:
        return jax.sharding.AbstractMesh(tuple(axis_sizes), tuple(axis_names), **kwargs)
    except TypeError:
        return jax.sharding.AbstractMesh(tuple(zip(axis_names, axis_sizes)), **kwargs)


# --- Lowering for accelerators on a host without one (tests/test_cross_lowering.py, ops/grouped_gemm.py) --------
GPU_TARGET_KIND = "NVIDIA H100"  # the GPU the cross-lowering tests target (sm_90: cuDNN MLA shapes, Triton)


def abstract_gpu_device(device_kind: str = GPU_TARGET_KIND, num_cores: int = 132):
    """``jax.sharding.AbstractDevice`` for a GPU the host does not have, or None where jax has no such class."""
    cls = getattr(jax.sharding, "AbstractDevice", None)
    if cls is None:
        return None
    return cls(device_kind=device_kind, num_cores=num_cores, platform="gpu")


def gpu_lowering_target(device_kind: str = GPU_TARGET_KIND):
    """Context under which Pallas Triton kernels lower for cuda without a GPU. jax 0.10 falls back to sm_90 by
    itself; from jax 0.11 the Triton lowering reads the target GPU from the current abstract mesh's
    ``abstract_device`` and fails without one. (A sharded step lowered on an ``AbstractMesh`` carries the device
    in that mesh instead: ``abstract_mesh(..., abstract_device=abstract_gpu_device())``.)"""
    if tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 11):
        return contextlib.nullcontext()  # the Triton lowering falls back to sm_90 by itself
    dev = abstract_gpu_device(device_kind)
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    if dev is None or use is None:
        return contextlib.nullcontext()
    return use(abstract_mesh((1,), ("_gpu_target",), abstract_device=dev))


def triton_compiler_params(num_warps: int = 4, num_stages: int = 3) -> dict:
    """``pallas_call`` keywords that select the Triton backend for a GPU lowering. jax 0.10 defaults
    ``jax_pallas_use_mosaic_gpu`` to True, so a kernel without Triton compiler params lowers through Mosaic GPU
    (which has no rule for a plain ``dot_general``); naming Triton's ``CompilerParams`` picks Triton in 0.10 and
    0.11 alike."""
    from jax.experimental.pallas import triton as pltriton  # lazy: pulls in the Pallas GPU lowering
    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
