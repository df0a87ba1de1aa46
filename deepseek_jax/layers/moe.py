"""DeepSeekMoE (V3 §2.1.2, eq. 12): h' = u + sum_i FFN_i^(s)(u) + sum_i g_i FFN_i^(r)(u) — fine-grained routed
experts chosen by the router (layers/router.py) plus always-on shared experts, all SwiGLU.

How routed rows meet their experts is an injected strategy (``MoE.dispatch``): ``ops.moe_dispatch.LocalDispatch``
(one device; ``ModelConfig.moe_dispatch`` names the kernel) by default, or ``ops.expert_parallel.
ExpertParallelDispatch`` (all-to-all over a mesh's "expert" axis), which the distributed step (parallel/step.py)
injects. The layer itself knows nothing of meshes or training.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense, dtype_of
from deepseek_jax.layers.router import Router
from deepseek_jax.ops.fp8 import Fp8DotGeneral
from deepseek_jax.ops.moe_dispatch import LocalDispatch, swiglu
from deepseek_jax.sharding import constrain


class MLP(nn.Module):
    """SwiGLU FFN, down(silu(x W_gate) * (x W_up)): the dense layers' FFN and the shared experts (width
    moe_intermediate_size * n_shared)."""

    cfg: ModelConfig
    width: int
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def dense(features, axes, name):
            return Dense(features, axes, cfg.dtype, cfg.param_dtype, cfg.initializer_range, self.dot_general,
                         name=name)

        gate, up = dense(self.width, ("embed", "mlp"), "gate_proj"), dense(self.width, ("embed", "mlp"), "up_proj")
        h = swiglu(gate(x), up(x))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class MoE(nn.Module):
    """Routed + shared experts. Returns (y [B, T, d], aux) with aux the router's statistics:
      load        [E]     tokens routed to each expert (sum over the batch)
      seq_counts  [B, E]  per-sequence routed counts  (f_i numerator of the sequence-wise loss, eq. 18)
      seq_probs   [B, E]  per-sequence mean of s_i / sum_j s_j  (P_i, eq. 19)
    plus whatever the dispatch strategy reports (ExpertParallelDispatch: "ep_dropped", routed rows its
    all-to-all buffer dropped over the whole batch; 0 when dropless)."""

    cfg: ModelConfig
    dot_general: Optional[object] = None
    dispatch: Optional[Any] = None  # None = LocalDispatch(cfg.moe_dispatch, cfg.moe_tile_size)

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        cfg = self.cfg
        B, T, d = x_btd.shape
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))  # no-op without a mesh (sharding.py)
        routing = Router(cfg, name="router")(x_btd)

        init = nn.initializers.normal(cfg.initializer_range)
        pdt = dtype_of(cfg.param_dtype)
        wg = self.param("experts_gate", nn.with_logical_partitioning(init, ("expert", "embed", "moe_mlp")),
                        (E, d, F), pdt)
        wu = self.param("experts_up", nn.with_logical_partitioning(init, ("expert", "embed", "moe_mlp")),
                        (E, d, F), pdt)
        wd = self.param("experts_down", nn.with_logical_partitioning(init, ("expert", "moe_mlp", "embed")),
                        (E, F, d), pdt)
        dt = dtype_of(cfg.dtype)
        dispatch = self.dispatch or LocalDispatch(cfg.moe_dispatch, cfg.moe_tile_size)
        fp8 = self.dot_general if isinstance(self.dot_general, Fp8DotGeneral) else None  # the FP8 policy, or None
        y, dispatch_aux = dispatch(x_btd.reshape(B * T, d).astype(dt), routing.experts_nk, routing.weights_nk,
                                   wg.astype(dt), wu.astype(dt), wd.astype(dt), fp8)
        y = y.astype(dt).reshape(B, T, d)
        if cfg.n_shared_experts > 0:
            y = y + MLP(cfg, F * cfg.n_shared_experts, self.dot_general, name="shared_experts")(x_btd)
        aux = {"load": routing.load_e, "seq_counts": routing.seq_counts_be, "seq_probs": routing.seq_probs_be,
               **dispatch_aux}
        return y, aux
