"""The distributed train and eval steps: ``train/step.py``'s steps jitted with NamedSharding in/out shardings on a
mesh (the pjit model), the train state's PartitionSpecs, sharded init, and the reviewable layout table.

The vocabulary (mesh axes, logical-axis rules, ``constrain``) is ``deepseek_jax/sharding.py``; this module only
applies it to whole states and steps:
- Optimizer moments get their parameter's sharding (``optax.tree_map_params``); scalars are replicated.
- The router bias ("router" collection) follows the same rules as parameters (its axes are ("layers", "expert")).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.model import Transformer
from deepseek_jax.ops.expert_parallel import dispatch_for
from deepseek_jax.sharding import (axis_sizes, batch_axes_size, batch_spec, mesh_shape, put_global, to_shardings,
                                   use_mesh, variable_specs)
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import TrainState, init_train_state, make_eval_step, make_train_step


def abstract_boxed_variables(model_cfg, seq_len: int = 8):
    """Boxed shapes of {"params", "router"} without allocating (jax.eval_shape of Transformer.init)."""
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
def state_specs(model_cfg, train_cfg, mesh_sizes: Mapping[str, int]):
    """PartitionSpecs of a ``TrainState`` (same tree): params and router by the rules, Adam moments like their
    parameter, step/skipped/counts replicated."""

    boxed = abstract_boxed_variables(model_cfg)
    specs = variable_specs(boxed, mesh_sizes)
    shapes = nn.meta.unbox(boxed)
    opt = make_optimizer(train_cfg.optim)
    opt_shapes = jax.eval_shape(opt.init, shapes["params"])
    opt_specs = optax.tree_map_params(opt, lambda _, s: s, opt_shapes, specs["params"],
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    return TrainState(step=P(), params=specs["params"], opt_state=opt_specs, router=specs.get("router", {}),
                      skipped=P())


def init_sharded_state(model_cfg, train_cfg, mesh, rng, seq_len: Optional[int] = None):
    """``init_train_state`` jitted with the state's out_shardings: each device materialises only its shards."""
    shardings = to_shardings(state_specs(model_cfg, train_cfg, axis_sizes(mesh)), mesh)
    init = jax.jit(lambda r: init_train_state(model_cfg, train_cfg, r, seq_len), out_shardings=shardings)
    return init(rng)  # traced without use_mesh: init runs the model on a 1-sequence dummy batch, no EP needed


def shard_state(state, model_cfg, train_cfg, mesh):
    """Place a host (or single-device) TrainState on the mesh by the rules; every process passes the same state."""
    shardings = to_shardings(state_specs(model_cfg, train_cfg, axis_sizes(mesh)), mesh)
    return put_global(jax.device_get(state), shardings)


def shard_train_step(model_cfg, train_cfg, mesh, donate: bool = True, ep_capacity_factor: Optional[float] = None):
    """``make_train_step`` jitted with in/out shardings on ``mesh``: (state, batch) -> (state, metrics).

    The state is sharded by ``state_specs``, the batch by ``batch_spec``, metrics are replicated. The step is
    traced with ``use_mesh(mesh)`` active, so ``constrain`` sees the mesh, and the MoE layers get the
    expert-parallel dispatch (``ops.expert_parallel.dispatch_for``) when the mesh has an "expert" axis > 1,
    with ``ep_capacity_factor`` its all-to-all buffer size (None = dropless). The batch's per-micro-batch size
    must be divisible by data * fsdp * expert."""
    sizes = axis_sizes(mesh)
    step = make_train_step(model_cfg, train_cfg, dispatch_for(model_cfg, mesh, ep_capacity_factor))
    state_sh = to_shardings(state_specs(model_cfg, train_cfg, sizes), mesh)
    replicated = NamedSharding(mesh, P())
    n_batch = batch_axes_size(sizes)

    def traced(state, batch):
        b = batch["tokens"].shape[-2]
        if b % n_batch:
            raise ValueError(f"batch['tokens']: per-micro-batch size {b} is not divisible by the mesh's batch "
                             f"axes data*fsdp*expert = {n_batch}")
        with use_mesh(mesh):
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
    step = make_eval_step(model_cfg, dispatch_for(model_cfg, mesh, ep_capacity_factor))
    n_batch = batch_axes_size(axis_sizes(mesh))

    def traced(params, router, batch):
        b = batch["tokens"].shape[-2]
        if b % n_batch:
            raise ValueError(f"batch['tokens']: batch size {b} is not divisible by the mesh's batch axes "
                             f"data*fsdp*expert = {n_batch}")
        with use_mesh(mesh):
            return step(params, router, batch)

    jitted = jax.jit(traced, out_shardings=NamedSharding(mesh, P()))

    def call(params, router, batch):
        return jitted(params, router, _put_host_batch(batch, mesh))

    call.jitted = jitted
    return call
