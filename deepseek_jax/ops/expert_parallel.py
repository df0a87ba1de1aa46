"""Expert parallelism (V3 §3.1-3.2: EP 64): routed rows travel to the devices holding their experts by all-to-all
and come back the same way, under ``shard_map`` over the mesh.

Layout (sharding.py): tokens are split over the batch axes ("data", "fsdp", "expert"), routed experts over
"expert" (E / P_ep experts per device, expert e on expert-rank e // (E / P_ep)), each expert's FFN width over
"tensor". Inside the shard_map every device holds n local tokens with their top-K routes:

  1. dispatch   each (token, k) row goes into the send buffer slot [dest rank, position], dest = e // E_loc,
                position = its rank among this device's rows for that destination (stable: token order).
  2. all-to-all over "expert" (``jax.lax.all_to_all``, static buffer [P_ep, C, d]).
  3. compute    the received rows through their local expert with the single-device dispatch of
                ``ops/moe_dispatch.py`` (``moe_dispatch``: sorted_tiles / ragged / dense), gate weight 1; with a
                tensor axis each rank computes its slice of the FFN width and the partial outputs are summed
                (psum over "tensor").
  4. all-to-all back, un-permute, combine sum_k g_k y_k in fp32 on the token's own device (same order of
                operations as the single-device combine).

Dropless (the default, ``capacity_factor=None``): C = n * K, the most rows one device can send to one peer, so no
row can ever be dropped, whatever the routing. The price is a buffer P_ep times the balanced size, which is right
for tests and small meshes and wasteful at EP 64. ``capacity_factor=c`` sizes C = ceil(c * n * K / P_ep) (rows
over capacity contribute zero, as in GShard) and the number of dropped rows is returned, summed over all devices,
so a run can report it (metrics "ep_dropped"); tests require it to be 0. (``jax.lax.ragged_all_to_all`` would
send only the routed rows, but its receive buffer must still be sized statically for the worst case, and it has
no CPU lowering to test here; the plan in experiments/plan.py reports the bytes of both buffer sizes.)

Router statistics are NOT computed here: the router runs outside the shard_map on globally sharded arrays, so the
expert loads that drive the aux-loss-free bias update are global sums over the whole batch (jit inserts the
reduction), exactly as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.ops.moe_dispatch import LocalDispatch

def capacity(n_local: int, k: int, n_ep: int, capacity_factor: Optional[float]) -> int:
    """Rows per (source, destination) pair of the static all-to-all buffer. None: n_local * k (dropless)."""
    if capacity_factor is None:
        return n_local * k
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
    return max(1, min(n_local * k, math.ceil(capacity_factor * n_local * k / n_ep)))


def _local_step(x_nd, idx_nk, w_nk, wg, wu, wd, *, n_ep, cap, dispatch, tile, tensor_size, all_axes,
                fp8=None):
    """Per-device body of the shard_map. x_nd [n, d] local tokens, idx_nk/w_nk [n, K] their routes, wg/wu [E_loc,
    d, F_loc], wd [E_loc, F_loc, d] this device's experts. Returns (y_nd fp32 [n, d], dropped [] int32, global).
    ``fp8`` (the FP8 policy, ops/fp8.py) runs the received rows' expert GEMMs in FP8."""

    n, K = idx_nk.shape
    d = x_nd.shape[1]
    e_loc = wg.shape[0]
    rows = n * K
    flat_e = idx_nk.reshape(rows).astype(jnp.int32)
    dest_r = flat_e // e_loc                                    # expert-axis rank holding each row's expert
    onehot_rp = (dest_r[:, None] == jnp.arange(n_ep, dtype=jnp.int32)[None, :]).astype(jnp.int32)
    pos_r = jnp.take_along_axis(jnp.cumsum(onehot_rp, axis=0) - 1, dest_r[:, None], axis=1)[:, 0]
    keep_r = pos_r < cap
    n_slots = n_ep * cap
    slot_r = jnp.where(keep_r, dest_r * cap + pos_r, n_slots)   # overflow -> one trash slot, cut below
    x_rd = x_nd[jnp.arange(rows) // K]
    send_x = jnp.zeros((n_slots + 1, d), x_nd.dtype).at[slot_r].set(x_rd, unique_indices=False)[:n_slots]
    send_e = jnp.full((n_slots + 1,), -1, jnp.int32).at[slot_r].set(flat_e % e_loc)[:n_slots]

    recv_x = jax.lax.all_to_all(send_x.reshape(n_ep, cap, d), "expert", 0, 0, tiled=True).reshape(n_slots, d)
    recv_e = jax.lax.all_to_all(send_e.reshape(n_ep, cap), "expert", 0, 0, tiled=True).reshape(n_slots)

    valid = recv_e >= 0
    local_idx, local_w = jnp.where(valid, recv_e, 0)[:, None], valid[:, None].astype(jnp.float32)
    # FP8 (fp8 set): per-row 1x128 activation tiles, per-expert 128x128 weight blocks, as on one device
    y_sd, _ = LocalDispatch(dispatch, tile)(recv_x, local_idx, local_w, wg, wu, wd, fp8)
    # y_sd: fp32 [n_slots, d]; empty slots give 0
    if tensor_size > 1:
        y_sd = jax.lax.psum(y_sd, "tensor")                     # partial sums over the FFN-width slices
    y_sd = y_sd.astype(x_nd.dtype)  # exact: each row's FFN output was computed in the compute dtype

    back = jax.lax.all_to_all(y_sd.reshape(n_ep, cap, d), "expert", 0, 0, tiled=True).reshape(n_slots, d)
    y_rd = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])[slot_r]   # dropped rows -> 0
    y_nd = jnp.einsum("nkd,nk->nd", y_rd.reshape(n, K, d).astype(jnp.float32), w_nk)
    dropped = jax.lax.psum(jnp.sum(~keep_r).astype(jnp.int32), all_axes)  # tokens vary over the batch axes only
    return y_nd, dropped


def routed_experts(x_nd, idx_nk, w_nk, wg, wu, wd, dispatch: str = "auto", tile: int = 128,
                   capacity_factor: Optional[float] = None, mesh=None,
                   fp8=None) -> Tuple[jax.Array, jax.Array]:
    """sum_k g_k * FFN_{e_k}(x_n) for every token with the experts spread over the mesh's "expert" axis.

    x_nd [N, d] (N = B*T, split over the batch axes), idx_nk / w_nk [N, K], wg / wu [E, d, F], wd [E, F, d].
    ``mesh`` defaults to the active one (``sharding.use_mesh``, entered by ``shard_train_step``).
    ``fp8``: the FP8 policy (``ModelConfig.fp8``); the local expert GEMMs then go through FP8 as on one device
    (moe_dispatch.LocalDispatch). The forward quantizes exactly as on one device (activation
    tiles are per row, weight blocks per expert); the Wgrad's 128x1 token tiles group the rows a device received.
    Returns (y [N, d] fp32, dropped: routed rows dropped over the whole batch, int32 scalar; 0 when dropless)."""
    mesh = mesh or sharding.active_mesh()
    if mesh is None:
        raise ValueError("the expert-parallel dispatch needs a mesh: pass mesh=, or trace inside "
                         "sharding.use_mesh(mesh)")
    sizes = sharding.axis_sizes(mesh)
    n_ep, n_tp = sizes["expert"], sizes["tensor"]
    E, N, K = wg.shape[0], x_nd.shape[0], idx_nk.shape[1]
    if E % n_ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by the mesh's expert axis ({n_ep})")
    n_b = sharding.batch_axes_size(sizes)
    if N % n_b:
        raise ValueError(f"MoE input: {N} tokens are not divisible by the mesh's batch axes data*fsdp*expert = "
                         f"{n_b}")
    cap = capacity(N // n_b, K, n_ep, capacity_factor)
    rows = P(sharding.BATCH_AXES)
    w_in = sharding.logical_to_spec(("expert", None, "moe_mlp"), wg.shape, sizes)
    w_out = sharding.logical_to_spec(("expert", "moe_mlp", None), wd.shape, sizes)
    tensor_split = n_tp > 1 and "tensor" in tuple(w_in)
    body = functools.partial(_local_step, n_ep=n_ep, cap=cap, dispatch=dispatch, tile=tile,
                             tensor_size=n_tp if tensor_split else 1, all_axes=sharding.BATCH_AXES,
                             fp8=fp8)
    f = sharding.shard_map(body, mesh, in_specs=(rows, rows, rows, w_in, w_in, w_out), out_specs=(rows, P()))
    return f(x_nd, idx_nk, w_nk, wg, wu, wd)


@dataclasses.dataclass(frozen=True)
class ExpertParallelDispatch:
    """The MoE layer's dispatch strategy on a mesh with an "expert" axis (see ``moe_dispatch.LocalDispatch`` for
    the contract): ``routed_experts`` above on ``mesh``, with ``name`` / ``tile`` the local dispatch each device
    runs on the rows it received and ``capacity_factor`` the all-to-all buffer size (None = dropless). Its aux
    holds "ep_dropped", the routed rows the buffer dropped over the whole batch."""

    mesh: Any
    name: str = "auto"
    tile: int = 128
    capacity_factor: Optional[float] = None

    def __call__(self, x_nd, idx_nk, w_nk, wg, wu, wd, fp8=None):
        y, dropped = routed_experts(x_nd, idx_nk, w_nk, wg, wu, wd, self.name, self.tile, self.capacity_factor,
                                    self.mesh, fp8)
        return y, {"ep_dropped": dropped}


def dispatch_for(model_cfg, mesh=None, capacity_factor: Optional[float] = None):
    """The dispatch strategy for ``model_cfg`` on ``mesh``: expert-parallel when the mesh has an "expert" axis of
    size > 1, else the local one (``ModelConfig.moe_dispatch`` / ``moe_tile_size``)."""
    if mesh is not None and sharding.axis_sizes(mesh).get("expert", 1) > 1:
        return ExpertParallelDispatch(mesh, model_cfg.moe_dispatch, model_cfg.moe_tile_size, capacity_factor)
    return LocalDispatch(model_cfg.moe_dispatch, model_cfg.moe_tile_size)
