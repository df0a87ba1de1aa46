"""DeepSeekMoE (V3 §2.1.2, eqs. 12-16): fine-grained routed experts, shared experts, and the router with
auxiliary-loss-free load balancing.

Router semantics (PAPER.md "Router", REFERENCE.md), all in fp32:
  s = sigmoid(u W_r)                        affinity (eq. 15); softmax for V2-style configs
  s' = s + b                                b: per-expert bias, non-trainable ("router" collection)
  group score = sum of the top-2 of s'      per group (noaux_tc; V2's group_limited_greedy uses the max of s)
  keep topk_group groups, mask the rest with -inf (scores can be negative after the bias)
  top-k experts by s' among the kept groups
  g = s at those experts (UNBIASED), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
Ties go to the lower index (jax.lax.top_k is stable), for groups and experts alike.

Dispatch (all dropless, all the same function; tests hold each equal to ``dense``):
  dense         every expert on every token, masked combine: obviously correct, O(E) compute. Reference only.
  ragged        sort routed rows by expert, jax.lax.ragged_dot (grouped GEMM on GPU/TPU).
  sorted_tiles  sort routed rows by expert, pad each expert's segment to a multiple of `moe_tile_size`, and
                loop over the used tiles, each one [tile, d] x [d, F] matmul with its expert's weights sliced in
                place (custom VJP: the backward is the same loop). On CPU, ragged_dot lowers to a masked dense
                computation; this path does only the routed FLOPs plus < 1 tile of padding per expert
                (experiments/results/moe_dispatch_cpu.md: 1.2x one equal-FLOP matmul). Reverse-mode only.
  auto          sorted_tiles on CPU, ragged elsewhere.
  gather        each routed row's expert weights gathered per row ([N*K, d, F]) and one batched matmul: reads
                N*K expert weights, no sort and no loop. For decode steps, where N*K is a handful of rows
                (generate.py picks it for N*K <= 8 on CPU; ~4x faster than 8-row tiles at batch 1).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense, dtype_of
from deepseek_jax.parallel import expert_parallel
from deepseek_jax.parallel.mesh import constrain


# ---------------------------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------------------------
def affinity(logits_ne: jax.Array, scoring_func: str) -> jax.Array:
    logits_ne = logits_ne.astype(jnp.float32)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits_ne)
    return jax.nn.softmax(logits_ne, axis=-1)


def route(scores_ne: jax.Array, bias_e: jax.Array, cfg: ModelConfig) -> Tuple[jax.Array, jax.Array]:
    """Group-limited top-k selection on biased scores; gate weights from unbiased scores.

    scores_ne: [N, E] affinities (fp32). Returns (weights [N, K] fp32, expert ids [N, K] int32).
    """
    N, E = scores_ne.shape
    G, K = cfg.n_group, cfg.num_experts_per_tok
    scores_ne = scores_ne.astype(jnp.float32)
    biased = scores_ne + bias_e.astype(jnp.float32)[None, :]
    if cfg.topk_method != "greedy" and cfg.topk_group < G:
        grouped = biased.reshape(N, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:  # group_limited_greedy (V2): best expert of each group
            group_scores = grouped.max(-1)
        _, group_idx = jax.lax.top_k(group_scores, cfg.topk_group)
        keep_g = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], group_idx].set(True)
        keep = jnp.repeat(keep_g, E // G, axis=1)
        choice = jnp.where(keep, biased, -jnp.inf)
    else:
        choice = biased
    _, idx = jax.lax.top_k(choice, K)
    weights = jnp.take_along_axis(scores_ne, idx, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Expert FFNs: SwiGLU, down(silu(x W_gate) * (x W_up)), stacked over experts: W_gate/W_up [E, d, F], W_down [E, F, d]
# ---------------------------------------------------------------------------------------------------------------
def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dispatch_dense(x_nd, idx_nk, w_nk, wg, wu, wd):
    """Reference: every expert on every token; combine with a [N, E] weight matrix that is zero off-route."""
    N, E = x_nd.shape[0], wg.shape[0]
    # x broadcast over experts: a batched matmul reads each expert's weights in place ("nd,edf->enf" would make
    # XLA transpose all weights into one [d, E*F] operand first)
    x_end = jnp.broadcast_to(x_nd[None], (E,) + x_nd.shape)
    h = _swiglu(jnp.einsum("end,edf->enf", x_end, wg), jnp.einsum("end,edf->enf", x_end, wu))
    y_end = jnp.einsum("enf,efd->end", h, wd)
    comb_ne = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_nk].add(w_nk)
    return jnp.einsum("ne,end->nd", comb_ne, y_end.astype(jnp.float32))


def _sort_by_expert(idx_nk, E):
    """Permutation of the N*K (token, slot) rows that groups them by expert (stable), and group sizes."""
    flat_e = idx_nk.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    return order, flat_e[order], sizes


def _unsort_combine(y_sorted, order, w_nk):
    N, K = w_nk.shape
    inv = jnp.argsort(order)
    y_nkd = y_sorted[inv].reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_nkd, w_nk)


def dispatch_ragged(x_nd, idx_nk, w_nk, wg, wu, wd):
    K, E = idx_nk.shape[1], wg.shape[0]
    order, _, sizes = _sort_by_expert(idx_nk, E)
    x_sorted = x_nd[order // K]
    h = _swiglu(jax.lax.ragged_dot(x_sorted, wg, sizes), jax.lax.ragged_dot(x_sorted, wu, sizes))
    y_sorted = jax.lax.ragged_dot(h.astype(x_nd.dtype), wd, sizes)
    return _unsort_combine(y_sorted, order, w_nk)


def _tile_layout(idx_nk, E: int, tile: int):
    """Where each routed row goes when rows are grouped by expert (stable) and each expert's group is padded to a
    multiple of `tile`: sum_e ceil(c_e / tile) <= ceil(NK / tile) + E - 1 =: n_tiles, a static bound; only the
    first `n_used` tiles hold rows and only they are computed.

    Returns (all int32)
      src      [P]       flat routed row (n * K + k) held by each padded slot; N*K for a padding slot
      dest     [N, K]    padded slot of each routed row (a bijection onto the non-padding slots)
      tile_e   [n_tiles] expert of each tile (E - 1 for the unused trailing tiles, which are never computed)
      n_used   []        number of tiles that hold rows
    """
    N, K = idx_nk.shape
    NK = N * K
    n_tiles = -(-NK // tile) + E - 1
    P = n_tiles * tile
    flat_e = idx_nk.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)
    e_sorted = flat_e[order]
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    padded = -(-sizes // tile) * tile
    pad_end = jnp.cumsum(padded, dtype=jnp.int32)
    pad_start = pad_end - padded
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    dest_sorted = pad_start[e_sorted] + jnp.arange(NK, dtype=jnp.int32) - start[e_sorted]
    dest = jnp.zeros((NK,), jnp.int32).at[order].set(dest_sorted, unique_indices=True)
    src = jnp.full((P,), NK, jnp.int32).at[dest_sorted].set(order, unique_indices=True)
    tile_e = jnp.searchsorted(pad_end, jnp.arange(n_tiles, dtype=jnp.int32) * tile, side="right")
    tile_e = jnp.minimum(tile_e, E - 1).astype(jnp.int32)
    n_used = (pad_end[-1] // tile).astype(jnp.int32)
    return src, dest.reshape(N, K), tile_e, n_used


def _take(w, e):
    return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep: bool):
    """Loop over the used tiles only: tile t's rows times expert tile_e[t]'s weights (sliced, not gathered)."""
    K = dest_nk.shape[1]
    d, F = x_nd.shape[1], wg.shape[2]
    P, n_tiles = src.shape[0], tile_e.shape[0]
    tile = P // n_tiles
    # src // K is the token of each slot; padding slots (src == N*K) read the appended zero row N.
    x_pad = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K]

    def body(t, carry):
        r0 = t * tile
        e = tile_e[t]
        x_t = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile)
        a, b = x_t @ _take(wg, e), x_t @ _take(wu, e)
        y_t = _swiglu(a, b) @ _take(wd, e)
        out = (jax.lax.dynamic_update_slice_in_dim(carry[0], y_t.astype(carry[0].dtype), r0, 0),)
        if keep:  # pre-activations, for the backward pass
            out += (jax.lax.dynamic_update_slice_in_dim(carry[1], a, r0, 0),
                    jax.lax.dynamic_update_slice_in_dim(carry[2], b, r0, 0))
        return out

    out_dt = jnp.result_type(x_nd.dtype, wd.dtype)
    act_dt = jnp.result_type(x_nd.dtype, wg.dtype)
    init = (jnp.zeros((P, d), out_dt),)
    if keep:
        init += (jnp.zeros((P, F), act_dt), jnp.zeros((P, F), act_dt))
    out = jax.lax.fori_loop(0, n_used, body, init)
    return out[0][dest_nk], (x_pad,) + tuple(out[1:])


@jax.custom_vjp
def _tiled_ffn(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used):
    """SwiGLU_{e}(x_n) for every routed row (n, k), as [N, K, d] in the compute dtype."""
    return _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep=False)[0]


def _tiled_ffn_fwd(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used):
    y, (x_pad, a_pad, b_pad) = _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep=True)
    return y, (x_nd, x_pad, a_pad, b_pad, wg, wu, wd, src, dest_nk, tile_e, n_used)


def _tiled_ffn_bwd(res, ct_nkd):
    """Same tile loop backwards; expert weight grads accumulate (fp32) in place into their expert's slice, and the
    row permutations are undone by gathers (src/dest are inverse bijections), never scatter-adds."""
    x_nd, x_pad, a_pad, b_pad, wg, wu, wd, src, dest_nk, tile_e, n_used = res
    N, K = dest_nk.shape
    d = x_nd.shape[1]
    P, n_tiles = src.shape[0], tile_e.shape[0]
    tile = P // n_tiles
    f32 = jnp.float32
    ct_flat = ct_nkd.reshape(N * K, d)
    ct_pad = jnp.concatenate([ct_flat, jnp.zeros((1, d), ct_flat.dtype)])[src]  # zero on padding slots
    tn = (((0,), (0,)), ((), ()))  # A^T B
    nt = (((1,), (1,)), ((), ()))  # A B^T

    def body(t, carry):
        dx_pad, dwg, dwu, dwd = carry
        r0 = t * tile
        e = tile_e[t]
        x_t = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile)
        dy_t = jax.lax.dynamic_slice_in_dim(ct_pad, r0, tile).astype(x_t.dtype)
        a = jax.lax.dynamic_slice_in_dim(a_pad, r0, tile).astype(f32)
        b = jax.lax.dynamic_slice_in_dim(b_pad, r0, tile).astype(f32)
        sig = jax.nn.sigmoid(a)
        silu = a * sig
        h = (silu * b).astype(x_t.dtype)
        dh = jax.lax.dot_general(dy_t, _take(wd, e), nt, preferred_element_type=f32)
        da = (dh * b * (sig * (1 + a * (1 - sig)))).astype(x_t.dtype)
        db = (dh * silu).astype(x_t.dtype)

        def acc(w, g):
            return jax.lax.dynamic_update_index_in_dim(w, _take(w, e) + g, e, 0)

        dwd = acc(dwd, jax.lax.dot_general(h, dy_t, tn, preferred_element_type=f32))
        dwg = acc(dwg, jax.lax.dot_general(x_t, da, tn, preferred_element_type=f32))
        dwu = acc(dwu, jax.lax.dot_general(x_t, db, tn, preferred_element_type=f32))
        dx_t = (jax.lax.dot_general(da, _take(wg, e), nt, preferred_element_type=f32)
                + jax.lax.dot_general(db, _take(wu, e), nt, preferred_element_type=f32))
        dx_pad = jax.lax.dynamic_update_slice_in_dim(dx_pad, dx_t, r0, 0)
        return dx_pad, dwg, dwu, dwd

    init = (jnp.zeros((P, d), f32), jnp.zeros(wg.shape, f32), jnp.zeros(wu.shape, f32), jnp.zeros(wd.shape, f32))
    dx_pad, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
    dx = dx_pad[dest_nk].sum(1)  # each token's K routed rows
    return (dx.astype(x_nd.dtype), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype),
            None, None, None, None)


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def dispatch_sorted_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int):
    """Rows grouped by expert and padded per expert to whole tiles; a loop over the used tiles does one
    [tile, d] x [d, F] (gate, up) and [tile, F] x [F, d] (down) matmul with that tile's expert's weights, sliced in
    place. Only routed rows plus < 1 tile of padding per expert are computed; unused tiles of the static bound are
    skipped. Custom VJP: the backward pass is the same loop (see _tiled_ffn_bwd)."""
    src, dest_nk, tile_e, n_used = _tile_layout(idx_nk, wg.shape[0], tile)
    y_nkd = _tiled_ffn(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used)
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)


def dispatch_fp8_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int, linear_fn):
    """The routed experts through the FP8 linear (kernels/fp8.py; ``ModelConfig.fp8``), whatever moe_dispatch
    says: rows grouped by expert and padded to whole tiles (as sorted_tiles), then every tile of the static bound
    is one ``linear_fn([tile, d], W_e)`` with its expert's weights (vmapped; unused tiles compute zeros). Each
    tile's GEMMs quantize like any FP8 linear (1x128 activation tiles, 128x128 expert-weight blocks; the Wgrad's
    token tiles are at most ``tile`` rows); the expert weight gradient is the fp32 sum over its tiles. Correct,
    reverse-mode differentiable, about (NK + (E-1) tile)/NK times the routed FLOPs: for correctness, not speed."""
    E, K = wg.shape[0], idx_nk.shape[1]
    d = x_nd.shape[1]
    src, dest_nk, tile_e, _ = _tile_layout(idx_nk, E, tile)
    n_tiles = tile_e.shape[0]
    x_ttd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K].reshape(n_tiles, tile, d)
    lin = jax.vmap(linear_fn)
    h_ttf = _swiglu(lin(x_ttd, wg[tile_e]), lin(x_ttd, wu[tile_e]))
    y_pd = lin(h_ttf.astype(x_nd.dtype), wd[tile_e]).reshape(n_tiles * tile, d)
    return jnp.einsum("nkd,nk->nd", y_pd[dest_nk].astype(jnp.float32), w_nk)


def resolve_dispatch(name: str) -> str:
    if name == "auto":
        return "sorted_tiles" if jax.default_backend() == "cpu" else "ragged"
    return name


def routed_experts(x_nd, idx_nk, w_nk, wg, wu, wd, dispatch: str, tile: int = 128):
    """sum_k g_k * FFN_{e_k}(x) for every token, by the chosen dispatch. Returns fp32 [N, d]."""
    dispatch = resolve_dispatch(dispatch)
    if dispatch == "dense":
        return dispatch_dense(x_nd, idx_nk, w_nk, wg, wu, wd)
    if dispatch == "ragged":
        return dispatch_ragged(x_nd, idx_nk, w_nk, wg, wu, wd)
    if dispatch == "sorted_tiles":
        return dispatch_sorted_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile)
    if dispatch == "gather":
        return dispatch_gather(x_nd, idx_nk, w_nk, wg, wu, wd)
    raise ValueError(f"unknown moe_dispatch {dispatch!r}")


def dispatch_gather(x_nd, idx_nk, w_nk, wg, wu, wd):
    """Every routed row (n, k) times its expert's weights gathered for that row (decode-sized N*K only: it reads
    N*K copies of an expert's weights)."""
    h_nkf = _swiglu(jnp.einsum("nd,nkdf->nkf", x_nd, wg[idx_nk]), jnp.einsum("nd,nkdf->nkf", x_nd, wu[idx_nk]))
    y_nkd = jnp.einsum("nkf,nkfd->nkd", h_nkf.astype(x_nd.dtype), wd[idx_nk])
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU FFN: the dense layers' FFN and the shared experts (width moe_intermediate_size * n_shared)."""

    cfg: ModelConfig
    width: int
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda feats, axes, name: Dense(feats, axes, cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                                                self.dot_general, name=name)
        h = _swiglu(dense(self.width, ("embed", "mlp"), "gate_proj")(x), dense(self.width, ("embed", "mlp"),
                                                                                "up_proj")(x))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class MoE(nn.Module):
    """Routed + shared experts. Returns (y, aux) with aux:
      load        [E]     tokens routed to each expert (sum over the batch; the bias update's input)
      seq_counts  [B, E]  per-sequence routed counts  (f_i numerator of the sequence-wise loss, eq. 18)
      seq_probs   [B, E]  per-sequence mean of s_i / sum_j s_j  (P_i, eq. 19)
      ep_dropped  []      only under expert parallelism (an active mesh with an "expert" axis > 1, set by
                          parallel/mesh.py): routed rows the all-to-all buffer dropped, whole batch (0 when dropless)
    """

    cfg: ModelConfig
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        cfg = self.cfg
        B, T, d = x_btd.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))  # no-op without a mesh (parallel/mesh.py)
        x_nd = x_btd.reshape(B * T, d)
        # Router in fp32, never FP8 (V3 §3.3).
        w_router = self.param("router_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("embed", "expert")), (d, E), dtype_of(cfg.param_dtype))
        bias = self.variable("router", "bias", nn.with_logical_partitioning(
            lambda shape: jnp.zeros(shape, jnp.float32), ("expert",)), (E,))
        logits = jnp.dot(x_nd.astype(jnp.float32), w_router.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        scores = affinity(logits, cfg.scoring_func)
        w_nk, idx_nk = route(scores, bias.value, cfg)

        init = nn.initializers.normal(cfg.initializer_range)
        pdt = dtype_of(cfg.param_dtype)
        wg = self.param("experts_gate", nn.with_logical_partitioning(init, ("expert", "embed", "moe_mlp")),
                        (E, d, F), pdt)
        wu = self.param("experts_up", nn.with_logical_partitioning(init, ("expert", "embed", "moe_mlp")),
                        (E, d, F), pdt)
        wd = self.param("experts_down", nn.with_logical_partitioning(init, ("expert", "moe_mlp", "embed")),
                        (E, F, d), pdt)
        dt = dtype_of(cfg.dtype)
        ep_aux = {}
        linear_fn = getattr(self.dot_general, "linear_fn", None)  # the FP8 policy (kernels/fp8.py), or None
        if expert_parallel.active_mesh() is not None:  # a sharded step with an "expert" mesh axis > 1
            y, ep_aux["ep_dropped"] = expert_parallel.routed_experts(
                x_nd.astype(dt), idx_nk, w_nk, wg.astype(dt), wu.astype(dt), wd.astype(dt), cfg.moe_dispatch,
                cfg.moe_tile_size, linear_fn=linear_fn)
        elif linear_fn is not None:  # FP8 policy (kernels/fp8.py)
            y = dispatch_fp8_tiles(x_nd.astype(dt), idx_nk, w_nk, wg.astype(dt), wu.astype(dt), wd.astype(dt),
                                   cfg.moe_tile_size, linear_fn)
        else:
            y = routed_experts(x_nd.astype(dt), idx_nk, w_nk, wg.astype(dt), wu.astype(dt), wd.astype(dt),
                               cfg.moe_dispatch, cfg.moe_tile_size)
        y = y.astype(dt).reshape(B, T, d)
        if cfg.n_shared_experts > 0:
            y = y + MLP(cfg, F * cfg.n_shared_experts, self.dot_general, name="shared_experts")(x_btd)

        onehot_btke = jax.nn.one_hot(idx_nk.reshape(B, T, -1), E, dtype=jnp.float32)
        seq_counts = onehot_btke.sum(axis=(1, 2))
        probs = scores / scores.sum(-1, keepdims=True) if cfg.scoring_func == "sigmoid" else scores
        aux = {"load": seq_counts.sum(0), "seq_counts": seq_counts,
               "seq_probs": probs.reshape(B, T, E).mean(1), **ep_aux}
        return y, aux
