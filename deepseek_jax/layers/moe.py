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

The routed experts' dispatch kernels are ``ops/moe_dispatch.py``; under expert parallelism
``ops/expert_parallel.py``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense, dtype_of
from deepseek_jax.ops import expert_parallel
from deepseek_jax.ops.moe_dispatch import dispatch_fp8_tiles, routed_experts, swiglu
from deepseek_jax.sharding import constrain


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
        h = swiglu(dense(self.width, ("embed", "mlp"), "gate_proj")(x), dense(self.width, ("embed", "mlp"),
                                                                                "up_proj")(x))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class MoE(nn.Module):
    """Routed + shared experts. Returns (y, aux) with aux:
      load        [E]     tokens routed to each expert (sum over the batch; the bias update's input)
      seq_counts  [B, E]  per-sequence routed counts  (f_i numerator of the sequence-wise loss, eq. 18)
      seq_probs   [B, E]  per-sequence mean of s_i / sum_j s_j  (P_i, eq. 19)
      ep_dropped  []      only under expert parallelism (an active mesh with an "expert" axis > 1, set by
                          sharding.py): routed rows the all-to-all buffer dropped, whole batch (0 when dropless)
    """

    cfg: ModelConfig
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        cfg = self.cfg
        B, T, d = x_btd.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))  # no-op without a mesh (sharding.py)
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
        linear_fn = getattr(self.dot_general, "linear_fn", None)  # the FP8 policy (ops/fp8.py), or None
        if expert_parallel.active_mesh() is not None:  # a sharded step with an "expert" mesh axis > 1
            y, ep_aux["ep_dropped"] = expert_parallel.routed_experts(
                x_nd.astype(dt), idx_nk, w_nk, wg.astype(dt), wu.astype(dt), wd.astype(dt), cfg.moe_dispatch,
                cfg.moe_tile_size, linear_fn=linear_fn)
        elif linear_fn is not None:  # FP8 policy (ops/fp8.py)
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
