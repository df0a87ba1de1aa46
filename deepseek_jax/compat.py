"""Everything that differs between the supported jax releases, in one place (BUILD.md "Tested stacks").

Callers use these names instead of probing jax themselves, so a new jax release means editing this file only.
"""

from __future__ import annotations

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
    """``jax.sharding.AbstractMesh(axis_sizes, axis_names)`` with every axis ``AxisType.Auto`` unless
    ``axis_types`` is given.

    Auto is what ``jax.sharding.Mesh`` (the concrete mesh a run uses) defaults to on every supported jax, and what
    AbstractMesh defaulted to up to jax 0.10. From jax 0.11 AbstractMesh defaults to ``Explicit``: shardings then
    become part of the types, and e.g. the embedding gather raises ShardingTypeError ("Use
    `.at[...].get(out_sharding=)`"), so the program lowered on an abstract mesh would not be the one a run
    compiles."""
    kwargs.setdefault("axis_types", (jax.sharding.AxisType.Auto,) * len(tuple(axis_names)))
    return jax.sharding.AbstractMesh(tuple(axis_sizes), tuple(axis_names), **kwargs)
