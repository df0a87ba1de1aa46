"""Device mesh, the logical-axis rules, and the sharded train step (jit with NamedSharding: the pjit model).

This module is the ONLY place that names mesh axes (DESIGN.md). The model names every parameter dimension with
a logical axis ("embed", "expert", "moe_mlp", ...; see ``LOGICAL_RULES``) and a few activations with
``constrain(x, ("batch", ...))``; the table below maps those names to mesh axes. Changing the parallel layout is
changing this table, never the model.

Mesh axes (all four always exist; size 1 = unused):
  data    pure data parallelism: parameters replicated, batch split.
  fsdp    data parallelism with ZeRO-3 sharding: the batch is split AND every parameter, its Adam moments and its
          gradient are split along their "embed" dimension; XLA all-gathers a weight before use and
          reduce-scatters its gradient.
  expert  expert parallelism (V3 §3.1: EP 64): routed experts are split over it, and, as in the paper, the same
          devices split the batch for everything that is not an expert (attention, dense FFN, shared experts).
          The routed rows travel by all-to-all (``parallel/expert_parallel.py``).
  tensor  tensor (Megatron) parallelism: attention heads, FFN width, expert FFN width, vocabulary.

Decisions:
- The batch is split over ("data", "fsdp", "expert"); "tensor" replicates it.
- A dimension that a rule maps to mesh axes whose product does not divide it stays unsharded (e.g. a norm gain,
  or "vocab" 129280 on a tensor axis of 3); a mesh axis already used by an earlier dimension of the same array is
  not reused (the first dimension wins). Both keep every spec legal for every config; the golden dump
  (tests/golden/) shows what each parameter actually gets.
- The router bias ("router" collection) follows the same rules as parameters (its axes are ("layers", "expert")).
- Optimizer moments get their parameter's sharding (``optax.tree_map_params``); scalars are replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def abstract_mesh(spec: Union[str, Mapping[str, int]]):
    """A ``jax.sharding.AbstractMesh`` (sizes and names, no devices) for lowering without the devices.
    jax >= 0.5 takes (axis_sizes, axis_names); older releases a tuple of (name, size) pairs."""
    shape = mesh_shape(spec)
    sizes, names = tuple(shape[a] for a in MESH_AXES), MESH_AXES
    try:
        return jax.sharding.AbstractMesh(sizes, names)
    except TypeError:
        return jax.sharding.AbstractMesh(tuple(zip(names, sizes)))


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
            raise ValueError(f"logical axis {name!r} has no rule in parallel.mesh.LOGICAL_RULES")
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


def abstract_boxed_variables(model_cfg, seq_len: int = 8):
    """Boxed shapes of {"params", "router"} without allocating (jax.eval_shape of Transformer.init)."""
    from deepseek_jax.model import Transformer  # local: the model does not depend on this module
    seq_len = max(seq_len, model_cfg.num_nextn_predict_layers + 2)
    return jax.eval_shape(lambda: Transformer(model_cfg).init(jax.random.PRNGKey(0),
                                                              jnp.zeros((1, seq_len), jnp.int32)))


def spec_table(model_cfg, spec) -> Dict[str, Any]:
    """{"mesh": sizes, "variables": {"params/embed/embedding": [mesh axes per dim], ...}} for every variable
    (params and router), JSON-ready: the reviewable record of the layout (tests/golden/)."""
    sizes = mesh_shape(spec)
    specs = variable_specs(abstract_boxed_variables(model_cfg), sizes)
    out = {}
    for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out[key] = [list(a) if isinstance(a, tuple) else a for a in s]
    return {"mesh": sizes, "variables": dict(sorted(out.items()))}


# ---------------------------------------------------------------------------------------------------------------
# Active mesh (for activation constraints and the expert-parallel dispatch, at trace time)
# ---------------------------------------------------------------------------------------------------------------
_ACTIVE = contextvars.ContextVar("deepseek_jax_mesh", default=None)
_EP_CAPACITY = contextvars.ContextVar("deepseek_jax_ep_capacity", default=None)


@contextlib.contextmanager
def use_mesh(mesh, ep_capacity_factor: Optional[float] = None):
    """Make ``mesh`` (a Mesh or AbstractMesh) the one that ``constrain`` and the expert-parallel dispatch see
    while a function is traced. ``shard_train_step`` enters it around tracing; use it around your own jit too.
    ``ep_capacity_factor``: None = dropless all-to-all buffers (expert_parallel.py), else the capacity factor."""
    token = _ACTIVE.set(mesh)
    token_c = _EP_CAPACITY.set(ep_capacity_factor)
    try:
        yield mesh
    finally:
        _EP_CAPACITY.reset(token_c)
        _ACTIVE.reset(token)


def active_mesh():
    return _ACTIVE.get()


def active_ep_capacity_factor() -> Optional[float]:
    return _EP_CAPACITY.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when no mesh is active (single device)."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    spec = logical_to_spec(names, x.shape, axis_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------------------------
# Train state and step
# ---------------------------------------------------------------------------------------------------------------
def state_specs(model_cfg, train_cfg, mesh_sizes: Mapping[str, int]):
    """PartitionSpecs of a ``TrainState`` (same tree): params and router by the rules, Adam moments like their
    parameter, step/skipped/counts replicated."""
    import optax
    from deepseek_jax.train.optimizer import make_optimizer
    from deepseek_jax.train.step import TrainState

    boxed = abstract_boxed_variables(model_cfg)
    specs = variable_specs(boxed, mesh_sizes)
    import flax.linen as nn
    shapes = nn.meta.unbox(boxed)
    opt = make_optimizer(train_cfg.optim)
    opt_shapes = jax.eval_shape(opt.init, shapes["params"])
    opt_specs = optax.tree_map_params(opt, lambda _, s: s, opt_shapes, specs["params"],
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    return TrainState(step=P(), params=specs["params"], opt_state=opt_specs, router=specs.get("router", {}),
                      skipped=P())


def to_shardings(specs, mesh):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int = 3) -> P:
    """tokens [n_micro, b, T+1] (or [B, T+1]): the per-micro-batch batch axis is split over BATCH_AXES."""
    return P(None, BATCH_AXES) if ndim == 3 else P(BATCH_AXES)


def batch_axes_size(mesh_sizes: Mapping[str, int]) -> int:
    return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def init_sharded_state(model_cfg, train_cfg, mesh, rng, seq_len: Optional[int] = None):
    """``init_train_state`` jitted with the state's out_shardings: each device materialises only its shards."""
    from deepseek_jax.train.step import init_train_state
    shardings = to_shardings(state_specs(model_cfg, train_cfg, axis_sizes(mesh)), mesh)
    init = jax.jit(lambda r: init_train_state(model_cfg, train_cfg, r, seq_len), out_shardings=shardings)
    return init(rng)  # traced without use_mesh: init runs the model on a 1-sequence dummy batch, no EP needed


def put_global(tree, shardings):
    """Global arrays from host values that every process holds in full (same seed, same checkpoint): each
    process fills only its addressable shards (``jax.make_array_from_callback``), so this works with one
    process or many."""
    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, tree, shardings)


def shard_state(state, model_cfg, train_cfg, mesh):
    """Place a host (or single-device) TrainState on the mesh by the rules; every process passes the same state."""
    shardings = to_shardings(state_specs(model_cfg, train_cfg, axis_sizes(mesh)), mesh)
    return put_global(jax.device_get(state), shardings)


def shard_batch(batch: Dict[str, Any], mesh, process_local: bool = False) -> Dict[str, jax.Array]:
    """Put a batch {"tokens": [n_micro, b, T+1], "mask"?: [n_micro, b, T]} on the mesh, batch axis split.

    ``process_local``: each process passes only its own rows (multi-controller input pipelines); the global batch
    is the concatenation over processes in process order (``jax.make_array_from_process_local_data``)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k in ("tokens", "mask") and v.ndim == 2:
            v = v[None]
        sharding = NamedSharding(mesh, batch_spec(v.ndim) if v.ndim >= 2 else P())
        if process_local:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
        else:
            out[k] = put_global(v, sharding)
    return out


def shard_train_step(model_cfg, train_cfg, mesh, donate: bool = True, ep_capacity_factor: Optional[float] = None):
    """``make_train_step`` jitted with in/out shardings on ``mesh``: (state, batch) -> (state, metrics).

    The state is sharded by ``state_specs``, the batch by ``batch_spec``, metrics are replicated. The step is
    traced with ``use_mesh(mesh)`` active, so ``constrain`` and ``moe_dispatch``'s expert-parallel path see the
    mesh. The batch's per-micro-batch size must be divisible by data * fsdp * expert."""
    from deepseek_jax.train.step import make_train_step
    sizes = axis_sizes(mesh)
    step = make_train_step(model_cfg, train_cfg)
    state_sh = to_shardings(state_specs(model_cfg, train_cfg, sizes), mesh)
    replicated = NamedSharding(mesh, P())
    n_batch = batch_axes_size(sizes)

    def traced(state, batch):
        b = batch["tokens"].shape[-2]
        if b % n_batch:
            raise ValueError(f"batch['tokens']: per-micro-batch size {b} is not divisible by the mesh's batch "
                             f"axes data*fsdp*expert = {n_batch}")
        with use_mesh(mesh, ep_capacity_factor):
            return step(state, batch)

    batch_sh = {"tokens": NamedSharding(mesh, batch_spec(3)), "mask": NamedSharding(mesh, batch_spec(3))}

    jitted = jax.jit(traced, in_shardings=(state_sh, None), out_shardings=(state_sh, replicated),
                     donate_argnums=(0,) if donate else ())

    def call(state, batch):
        return jitted(state, _put_host_batch(batch, mesh))

    call.jitted = jitted
    call.state_shardings = state_sh
    call.batch_shardings = batch_sh
    return call


def _put_host_batch(batch: Dict[str, Any], mesh) -> Dict[str, Any]:
    """The steps' inputs: "tokens" / "mask" given as host values (the same on every process; [B, T(+1)] or
    [n, b, T(+1)]) become global [n, b, ...] arrays split over the batch axes; jax.Arrays pass as they are."""
    batch = dict(batch)
    n_batch = batch_axes_size(axis_sizes(mesh))
    for k in ("tokens", "mask"):
        if k in batch and not isinstance(batch[k], jax.Array):
            v = np.asarray(batch[k])
            v = v[None] if v.ndim == 2 else v
            if v.shape[1] % n_batch:
                raise ValueError(f"batch[{k!r}]: batch size {v.shape[1]} is not divisible by the mesh's batch "
                                 f"axes data*fsdp*expert = {n_batch}")
            batch[k] = put_global(v, NamedSharding(mesh, batch_spec(3)))
    return batch


def shard_eval_step(model_cfg, mesh, ep_capacity_factor: Optional[float] = None):
    """``make_eval_step`` on ``mesh``: (params, router, batch) -> replicated sums. The batch (host values, the
    same on every process: tokens [B, T+1] or [n, b, T+1], mask alike) is split over the batch axes; the params
    keep their shardings; traced with ``use_mesh`` so the experts run expert-parallel as in training."""
    from deepseek_jax.train.step import make_eval_step
    step = make_eval_step(model_cfg)
    n_batch = batch_axes_size(axis_sizes(mesh))

    def traced(params, router, batch):
        b = batch["tokens"].shape[-2]
        if b % n_batch:
            raise ValueError(f"batch['tokens']: batch size {b} is not divisible by the mesh's batch axes "
                             f"data*fsdp*expert = {n_batch}")
        with use_mesh(mesh, ep_capacity_factor):
            return step(params, router, batch)

    jitted = jax.jit(traced, out_shardings=NamedSharding(mesh, P()))

    def call(params, router, batch):
        return jitted(params, router, _put_host_batch(batch, mesh))

    call.jitted = jitted
    return call
