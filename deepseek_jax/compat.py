"""Everything that differs between the supported jax releases, in one place (BUILD.md "Tested stacks").

Callers use these names instead of probing jax themselves, so a new jax release means editing this file only.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import jax

from deepseek_jax import host

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
    """``jax.sharding.AbstractMesh(axis_sizes, axis_names)`` with every axis ``AxisType.Auto`` unless
    ``axis_types`` is given.

    Auto is what ``jax.sharding.Mesh`` (the concrete mesh a run uses) defaults to on every supported jax, and what
    AbstractMesh defaulted to up to jax 0.10. From jax 0.11 AbstractMesh defaults to ``Explicit``: shardings then
    become part of the types, and e.g. the embedding gather raises ShardingTypeError ("Use
    `.at[...].get(out_sharding=)`"), so the program lowered on an abstract mesh would not be the one a run
    compiles."""
    kwargs.setdefault("axis_types", (jax.sharding.AxisType.Auto,) * len(tuple(axis_names)))
    return jax.sharding.AbstractMesh(tuple(axis_sizes), tuple(axis_names), **kwargs)


def manual_axes() -> frozenset:
    """Mesh axes that are manual where this is traced (inside ``shard_map``); empty outside. Both supported
    releases expose ``jax.sharding.get_abstract_mesh().manual_axes``."""
    am = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(am, "manual_axes", ()) or ())


def reshard(x, mesh, spec):
    """``x`` laid out as ``spec`` on ``mesh`` before it enters ``shard_map``. Auto mesh axes (jax 0.10's default):
    nothing to do, shard_map's in_specs make XLA reshard. Explicit axes (jax 0.11's AbstractMesh default): the
    value's type carries its sharding and shard_map demands it match, so ``jax.sharding.reshard``."""
    types = getattr(mesh, "axis_types", None)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is None or not types or explicit not in types:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))


def abstract_gpu(device_kind: str = "NVIDIA H100 80GB HBM3", num_cores: int = 132):
    """A ``jax.sharding.AbstractDevice`` standing for a Hopper GPU, for lowering GPU Pallas kernels on a machine
    without one: from jax 0.11 the Triton and Mosaic GPU lowerings read the device kind (compute capability) and
    core count from the abstract mesh instead of requiring a real device."""
    return jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")


def gpu_lowering_mesh(device=None):
    """A 1-device AbstractMesh carrying :func:`abstract_gpu`, to enter with ``jax.sharding.use_abstract_mesh``
    around a GPU export of an unsharded function."""
    return jax.sharding.AbstractMesh((1,), ("_gpu",), abstract_device=device or abstract_gpu())


def mosaic_gpu():
    """``jax.experimental.pallas.mosaic_gpu`` with what the Hopper FP8 kernel needs (plgpu.kernel, emit_pipeline
    with a carry, wgmma, ACC, Layout.WGMMA.reduce), or ImportError naming what is missing on this jax."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except Exception as e:  # noqa: BLE001 - any import failure means the backend is unavailable
        raise ImportError(f"Pallas Mosaic GPU is not importable on jax {jax.__version__}: {e}") from e
    missing = [n for n in ("kernel", "emit_pipeline", "wgmma", "ACC", "Layout", "nd_loop", "find_swizzle",
                           "layout_cast", "TilingTransform", "SwizzleTransform") if not hasattr(plgpu, n)]
    if missing:
        raise ImportError(f"jax {jax.__version__}'s Pallas Mosaic GPU lacks {missing} (needed by the Hopper FP8 "
                          "kernel; tested on jax 0.10.2, 0.11.2 and 0.12.1)")
    return plgpu


def mosaic_gpu_load(plgpu, ref, layout):
    """``plgpu.load`` of a whole (already indexed) ref into ``layout``: jax 0.10 requires an index argument (``()``
    for none), jax 0.11 makes it optional, jax 0.12 removed it."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def gpu_core_count(default: int = 132) -> int:
    """SMs of the GPU being lowered for: the abstract mesh's device (see :func:`abstract_gpu`), else the default
    device's ``core_count``, else ``default`` (H100 SXM: 132)."""
    ad = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if ad is not None and getattr(ad, "num_cores", None):
        return int(ad.num_cores)
    try:
        d = jax.devices()[0]
        if d.platform == "gpu" and getattr(d, "core_count", None):
            return int(d.core_count)
    except RuntimeError:
        pass
    return default


def mosaic_gpu_interpret_params():
    """Parameters that make ``plgpu.kernel`` run in jax's Mosaic GPU interpreter on CPU (jax >= 0.11:
    ``plgpu.InterpretGPUParams``); NotImplementedError on releases without it (jax 0.10.2)."""
    plgpu = mosaic_gpu()
    if not hasattr(plgpu, "InterpretGPUParams"):
        raise NotImplementedError(f"jax {jax.__version__} has no Mosaic GPU interpreter (plgpu.InterpretGPUParams "
                                  "is new in jax 0.11); the mosaic_gpu kernel runs only compiled here")
    return plgpu.InterpretGPUParams()


def auto_axes(n: int) -> dict:
    """AbstractMesh keyword for ``n`` Auto (compiler-partitioned) axes: jax 0.10's default; jax 0.11's
    AbstractMesh defaults to Explicit axes, under which values carry their shardings in their types."""
    at = getattr(jax.sharding, "AxisType", None)
    return {} if at is None else {"axis_types": (at.Auto,) * n}


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


# ---------------------------------------------------------------------------------------------------------------
# XLA:CPU flags (BUILD.md "CPU speed")
# ---------------------------------------------------------------------------------------------------------------
# oneDNN for XLA:CPU's matmuls and fusions: on jax 0.10.2 (2-core AMD EPYC) the train step of the quickstart-shaped
# model is ~16-24% faster with it and the tests pass with it; on jax 0.11.2 it changes nothing measurable.
CPU_XLA_FLAGS = ("--xla_cpu_use_onednn=true",)
NO_CPU_FLAGS_ENV = "DEEPSEEK_JAX_NO_CPU_FLAGS"  # set to 1 to run with XLA's own defaults


def use_cpu_xla_flags(environ=None) -> list:
    """Append ``CPU_XLA_FLAGS`` to ``XLA_FLAGS``, each unless that flag is already named there (a user's setting
    wins) or ``DEEPSEEK_JAX_NO_CPU_FLAGS=1``. XLA reads XLA_FLAGS once, when jax first initialises a backend, so
    this must run before any computation: the command-line entry points call it first. Returns the flags added
    ([] when disabled, already set, or too late: then nothing is changed)."""
    env = os.environ if environ is None else environ
    if env.get(NO_CPU_FLAGS_ENV, "") not in ("", "0"):
        return []
    from jax._src import xla_bridge  # every supported jax has it
    if environ is None and xla_bridge.backends_are_initialized():
        return []
    have = env.get("XLA_FLAGS", "")
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in have]
    if added:
        env["XLA_FLAGS"] = " ".join([have] + added).strip()
    return added


HOST_SETTINGS = ("jax_cpu_enable_async_dispatch=False", host.SETTINGS)


def use_cpu_settings() -> list:
    """``use_cpu_xla_flags``, then the host side of an XLA:CPU step (``deepseek_jax.host``): JAX's CPU dispatch made
    synchronous, so a step runs on the calling thread and its temporaries come from glibc's main heap, and that
    heap made to keep freed memory, so a step reuses the pages of the one before instead of faulting them in
    afresh (on jax 0.10.2, 2-core AMD EPYC: the base model's step ~68 -> ~48 ms, its kernel time 35 -> 1 ms).
    Process-wide and for the process's whole life; ``DEEPSEEK_JAX_NO_CPU_FLAGS=1`` turns all of it off. Like the
    flags, it must run before jax initialises a backend: the command-line entry points call it first. Returns the
    flags and settings applied ([] when disabled or too late)."""
    added = use_cpu_xla_flags()
    if os.environ.get(NO_CPU_FLAGS_ENV, "") not in ("", "0"):
        return added
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized() or "jax_cpu_enable_async_dispatch" not in jax.config.values:
        return added  # too late, or a jax without the option: the malloc settings alone would not reach the step
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    added.append(HOST_SETTINGS[0])
    if host.keep_freed_memory():
        added.append(HOST_SETTINGS[1])
    return added
