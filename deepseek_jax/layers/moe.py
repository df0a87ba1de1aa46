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
  sorted_tiles  sort routed rows by expert, pad each expert's segment to a multiple of `moe_tile_size`, gather
                each tile's expert weights, one batched matmul. On CPU, ragged_dot lowers to a masked dense
                computation; this path does only the routed FLOPs (plus < 1 tile of padding per expert).
  auto          sorted_tiles on CPU, ragged elsewhere.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense, dtype_of


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
    h = _swiglu(jnp.einsum("nd,edf->enf", x_nd, wg), jnp.einsum("nd,edf->enf", x_nd, wu))
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


def dispatch_sorted_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int):
    N, K = idx_nk.shape
    E = wg.shape[0]
    NK = N * K
    order, e_sorted, sizes = _sort_by_expert(idx_nk, E)
    # Each expert's segment is padded to a multiple of `tile`: sum_e ceil(c_e / tile) <= ceil(NK / tile) + E - 1.
    n_tiles = -(-NK // tile) + E - 1
    P = n_tiles * tile
    padded = -(-sizes // tile) * tile
    pad_start = jnp.cumsum(padded) - padded
    start = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(NK, dtype=jnp.int32) - start[e_sorted]
    dest = pad_start[e_sorted] + rank  # slot of each sorted row in the padded layout
    src = jnp.full((P,), NK, jnp.int32).at[dest].set(jnp.arange(NK, dtype=jnp.int32))
    x_sorted = x_nd[order // K]
    x_pad = jnp.concatenate([x_sorted, jnp.zeros((1, x_nd.shape[1]), x_nd.dtype)])[src]
    tile_e = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_tiles) * tile, side="right")
    tile_e = jnp.minimum(tile_e, E - 1)  # trailing all-padding tiles: any expert, their rows are zero
    x_t = x_pad.reshape(n_tiles, tile, -1)
    h = _swiglu(jnp.einsum("tsd,tdf->tsf", x_t, wg[tile_e]), jnp.einsum("tsd,tdf->tsf", x_t, wu[tile_e]))
    y_t = jnp.einsum("tsf,tfd->tsd", h, wd[tile_e])
    y_sorted = y_t.reshape(P, -1)[dest]
    return _unsort_combine(y_sorted, order, w_nk)


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
    raise ValueError(f"unknown moe_dispatch {dispatch!r}")


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
    """

    cfg: ModelConfig
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        cfg = self.cfg
        B, T, d = x_btd.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
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
        y = routed_experts(x_nd.astype(dt), idx_nk, w_nk, wg.astype(dt), wu.astype(dt), wd.astype(dt),
                           cfg.moe_dispatch, cfg.moe_tile_size)
        y = y.astype(dt).reshape(B, T, d)
        if cfg.n_shared_experts > 0:
            y = y + MLP(cfg, F * cfg.n_shared_experts, self.dot_general, name="shared_experts")(x_btd)

        onehot_btke = jax.nn.one_hot(idx_nk.reshape(B, T, -1), E, dtype=jnp.float32)
        seq_counts = onehot_btke.sum(axis=(1, 2))
        probs = scores / scores.sum(-1, keepdims=True) if cfg.scoring_func == "sigmoid" else scores
        aux = {"load": seq_counts.sum(0), "seq_counts": seq_counts,
               "seq_probs": probs.reshape(B, T, E).mean(1)}
        return y, aux
