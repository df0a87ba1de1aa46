"""The sharding vocabulary: mesh axes, the logical-axis rules table, logical names -> PartitionSpec, the active
mesh and ``constrain``, mesh construction, and a version-stable ``shard_map``.

This module is the ONLY place that names mesh axes (docs/parallelism.md). It imports no other deepseek_jax module
but compat, so every layer may use it. The model names every parameter dimension with a logical axis ("embed",
"expert", "moe_mlp", ...; see ``LOGICAL_RULES``) and a few activations with ``constrain(x, ("batch", ...))``; the
table below maps those names to mesh axes. Changing the parallel layout is changing this table, never the model.
The distributed train and eval steps built on it live in ``parallel/step.py``.

Mesh axes (all four always exist; size 1 = unused):
  data    pure data parallelism: parameters replicated, batch split.
  fsdp    data parallelism with ZeRO-3 sharding: the batch is split AND every parameter, its Adam moments and its
          gradient are split along their "embed" dimension; XLA all-gathers a weight before use and
          reduce-scatters its gradient.
  expert  expert parallelism (V3 §3.1: EP 64): routed experts are split over it, and, as in the paper, the same
          devices split the batch for everything that is not an expert (attention, dense FFN, shared experts).
          The routed rows travel by all-to-all (``ops/expert_parallel.py``).
  tensor  tensor (Megatron) parallelism: attention heads, FFN width, expert FFN width, vocabulary.

Decisions:
- The batch is split over ("data", "fsdp", "expert"); "tensor" replicates it.
- A dimension that a rule maps to mesh axes whose product does not divide it stays unsharded (e.g. a norm gain,
  or "vocab" 129280 on a tensor axis of 3); a mesh axis already used by an earlier dimension of the same array is
  not reused (the first dimension wins). Both keep every spec legal for every config; the golden dump
  (tests/golden/) shows what each parameter actually gets.
- The router bias ("router" collection) follows the same rules as parameters (its axes are ("layers", "expert")).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax import compat

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The single table of the project.
LOGICAL_RULES: Dict[str, Union[None, str, Tuple[str, ...]]] = {
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    # parameters
    "layers": None,        # the nn.scan axis of stacked blocks
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": "fsdp",      # only where "embed" is absent (q_b_proj, kv_b_proj): ZeRO-3 shards every matrix
    "kv_lora": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "o_heads": "tensor",
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "expert": "expert",
    "norm": None,
}


# ---------------------------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------------------------
def mesh_shape(spec: Union[str, Mapping[str, int], None]) -> Dict[str, int]:
    """Normalise a mesh description to {"data", "fsdp", "expert", "tensor"} -> size (missing axes are 1).

    Accepts a mapping ({"data": 2, "expert": 4}) or a string "data=2,expert=4". Raises ValueError naming the axis
    for an unknown axis or a non-positive size."""
    if spec is None:
        spec = {}
    if isinstance(spec, str):
        d = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"mesh: expected 'axis=size' items separated by commas, got {part!r}")
            k, v = part.split("=", 1)
            try:
                d[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"mesh.{k.strip()}: size must be an int, got {v!r}") from None
        spec = d
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis/axes {sorted(unknown)}; the axes are {MESH_AXES}")
    out = {}
    for a in MESH_AXES:
        v = spec.get(a, 1)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mesh.{a}: size must be a positive int, got {v!r}")
        out[a] = int(v)
    return out


def make_mesh(spec: Union[str, Mapping[str, int], None] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes MESH_AXES over ``devices`` (default: all devices, every process).

    Device order: ``jax.devices()`` order reshaped row-major, so the last axis ("tensor") is the fastest-varying
    (neighbouring devices, the fastest links), then "expert", then "fsdp", then "data" (the slowest, across
    hosts/slices)."""
    shape = mesh_shape(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(shape.values())
    if n != len(devices):
        raise ValueError(f"mesh: {shape} needs {n} devices, but {len(devices)} are available")
    arr = np.asarray(devices, dtype=object).reshape(tuple(shape[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


def abstract_mesh(spec: Union[str, Mapping[str, int]], **kwargs):
    """A ``jax.sharding.AbstractMesh`` (sizes and names, no devices) for lowering without the devices.
    ``kwargs`` go to AbstractMesh (e.g. ``abstract_device=compat.abstract_gpu()`` to lower GPU Pallas kernels)."""
    shape = mesh_shape(spec)
    return compat.abstract_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, **kwargs)


def axis_sizes(mesh) -> Dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)


# ---------------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------------
def _as_tuple(m) -> Tuple[str, ...]:
    if m is None:
        return ()
    return (m,) if isinstance(m, str) else tuple(m)


def logical_to_spec(names: Sequence[Optional[str]], shape: Optional[Sequence[int]], mesh_sizes: Mapping[str, int],
                    rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with logical ``names`` (one per dimension, None = unnamed/replicated).

    Unknown logical names raise ValueError (a new parameter axis must get a rule). With ``shape`` given, a
    dimension whose size is not divisible by the product of its mesh axes stays unsharded; a mesh axis is used at
    most once per array (first dimension wins); mesh axes of size 1 are dropped (so specs read the same on every
    mesh that does not split that way)."""
    used = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
        axes = tuple(a for a in _as_tuple(rules[name]) if mesh_sizes.get(a, 1) > 1 and a not in used)
        if shape is not None and axes and shape[i] % math.prod(mesh_sizes[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_boxed(x) -> bool:
    import flax.linen as nn
    return isinstance(x, nn.LogicallyPartitioned)


def variable_specs(boxed, mesh_sizes: Mapping[str, int]):
    """Tree of PartitionSpecs for a boxed variable tree (``Transformer(cfg).init`` / ``jax.eval_shape`` of it,
    with ``nn.LogicallyPartitioned`` leaves). Unboxed leaves (no logical names) are replicated."""
    def spec(x):
        if _is_boxed(x):
            return logical_to_spec(x.names, x.value.shape, mesh_sizes)
        return P()
    return jax.tree_util.tree_map(spec, boxed, is_leaf=_is_boxed)


# ---------------------------------------------------------------------------------------------------------------
# Active mesh (for activation constraints and the expert-parallel dispatch, at trace time)
# ---------------------------------------------------------------------------------------------------------------
_ACTIVE = contextvars.ContextVar("deepseek_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh):
    """Make ``mesh`` (a Mesh or AbstractMesh) the one that ``constrain`` sees while a function is traced.
    ``parallel/step.py`` enters it around tracing its steps; use it around your own jit too."""
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when no mesh is active (single device)."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    spec = logical_to_spec(names, x.shape, axis_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_shardings(specs, mesh):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int = 3) -> P:
    """tokens [n_micro, b, T+1] (or [B, T+1]): the per-micro-batch batch axis is split over BATCH_AXES."""
    return P(None, BATCH_AXES) if ndim == 3 else P(BATCH_AXES)


def batch_axes_size(mesh_sizes: Mapping[str, int]) -> int:
    return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def put_global(tree, shardings):
    """Global arrays from host values that every process holds in full (same seed, same checkpoint): each
    process fills only its addressable shards (``jax.make_array_from_callback``), so this works with one
    process or many."""
    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, tree, shardings)



def shard_map(f, mesh, in_specs, out_specs):
    """``shard_map`` (compat.py: jax.shard_map or its older experimental home) with the varying-axes
    (replication) check off: the local MoE dispatches (ops/moe_dispatch.py) carry loop state created with jnp.zeros
    (mesh-invariant) through fori_loops whose bodies make it device-varying, which the check rejects, and the ops
    must not know mesh axes to annotate it. Without the check, autodiff stays correct: the transpose sums the
    cotangent of an input over the mesh axes its spec does not mention (a weight replicated over "data" gets its
    gradient summed over "data") after dividing replicated outputs' cotangents by those axes' sizes; the
    sharded-vs-single-device tests (tests/parallel) hold the gradients to 1e-5."""
    return compat.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check=False)
