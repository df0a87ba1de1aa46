"""The DeepSeekMoE router with auxiliary-loss-free load balancing (V3 §2.1.2, eqs. 12-16; docs/checkpoint_format.md
"Router semantics"), all in fp32 and never in FP8 (V3 §3.3):

  s = sigmoid(u W_r)                        affinity (eq. 15); softmax for V2-style configs
  s' = s + b                                b: per-expert bias, non-trainable ("router" collection)
  group score = sum of the top-2 of s'      per group (noaux_tc; V2's group_limited_greedy uses the max of s)
  keep topk_group groups, mask the rest with -inf (scores can be negative after the bias)
  top-k experts by s' among the kept groups
  g = s at those experts (UNBIASED), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor

Ties go to the lower index (jax.lax.top_k is stable), for groups and experts alike. The ``Router`` module owns the
kernel W_r ("params"), the bias b ("router" collection) and the routing statistics; it returns a ``Routing``.
When the caller makes the "router_load" collection mutable, each Router also records its expert load there, at
the same module path as its bias: the bias update (train/step.py) pairs the two trees, whatever the model's shape.
"""

from __future__ import annotations

from typing import Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import dtype_of

LOAD_COLLECTION = "router_load"


def affinity(logits_ne: jax.Array, scoring_func: str) -> jax.Array:
    """s = sigmoid(u W_r) (V3 eq. 15) or softmax (V2), in fp32."""
    logits_ne = logits_ne.astype(jnp.float32)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits_ne)
    return jax.nn.softmax(logits_ne, axis=-1)


def route(scores_ne: jax.Array, bias_e: jax.Array, cfg: ModelConfig) -> Tuple[jax.Array, jax.Array]:
    """Group-limited top-k selection on biased scores; gate weights from unbiased scores (V3 eqs. 13, 16).

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


@flax.struct.dataclass
class Routing:
    """What the router decided for N = B * T tokens, and the statistics balancing needs:
      weights_nk     [N, K] gate weights g (fp32)          experts_nk  [N, K] expert ids (int32)
      load_e         [E]    tokens routed to each expert (the bias update's input; MaxVio)
      seq_counts_be  [B, E] per-sequence routed counts (f_i numerator of the sequence-wise loss, eq. 18)
      seq_probs_be   [B, E] per-sequence mean of s_i / sum_j s_j (P_i, eq. 19)"""

    weights_nk: jax.Array
    experts_nk: jax.Array
    load_e: jax.Array
    seq_counts_be: jax.Array
    seq_probs_be: jax.Array


class Router(nn.Module):
    """u [B, T, d] -> Routing. Parameters: "kernel" W_r [d, E] ("params"), "bias" b [E] ("router" collection,
    zero-initialised, updated outside the optimizer by train/step.py's bias update)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, u_btd: jax.Array) -> Routing:
        cfg = self.cfg
        B, T, d = u_btd.shape
        E = cfg.n_routed_experts
        kernel_de = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("embed", "expert")), (d, E), dtype_of(cfg.param_dtype))
        bias = self.variable("router", "bias", nn.with_logical_partitioning(
            lambda shape: jnp.zeros(shape, jnp.float32), ("expert",)), (E,))
        logits_ne = jnp.dot(u_btd.reshape(B * T, d).astype(jnp.float32), kernel_de.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        scores_ne = affinity(logits_ne, cfg.scoring_func)
        weights_nk, experts_nk = route(scores_ne, bias.value, cfg)

        seq_counts_be = jax.nn.one_hot(experts_nk.reshape(B, T * cfg.num_experts_per_tok), E,
                                       dtype=jnp.float32).sum(1)
        probs_ne = scores_ne / scores_ne.sum(-1, keepdims=True) if cfg.scoring_func == "sigmoid" else scores_ne
        load_e = seq_counts_be.sum(0)
        if self.is_mutable_collection(LOAD_COLLECTION) and not self.is_initializing():
            self.variable(LOAD_COLLECTION, "load", jnp.zeros, (E,), jnp.float32).value = load_e
        return Routing(weights_nk=weights_nk, experts_nk=experts_nk, load_e=load_e, seq_counts_be=seq_counts_be,
                       seq_probs_be=probs_ne.reshape(B, T, E).mean(1))
