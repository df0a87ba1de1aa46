"""Multi-token prediction (V3 §2.2, eqs. 21-25).

Module k (k = 1..D) at position i combines the previous depth's representation h_i^{k-1} with the embedding
of token t_{i+k}:  h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]  (eq. 21), runs one Transformer
block (eq. 22) and predicts t_{i+k+1} through its own output norm and the SHARED output head (eq. 23).

Two details follow the released checkpoint and the serving engines that load it (vLLM, SGLang) rather than the
paper's notation:
- concatenation order is [enorm(embedding); hnorm(hidden)] (the paper writes h first); eh_proj's columns are
  trained for this order;
- h^0 is the main model's final hidden state AFTER its final norm (what vLLM/SGLang pass to the MTP layer);
  h^k for k >= 1 is module k's block output, before its output norm.
Parameter names mirror the hub's layer `model.layers.{L+k-1}`: enorm, hnorm, eh_proj, the block, shared_head.norm.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense
from deepseek_jax.layers.norms import RMSNorm


class MTPModule(nn.Module):
    cfg: ModelConfig
    block_cls: type
    layer_idx: int  # index of this module's block in HF numbering (num_hidden_layers + k - 1)
    dot_general: Optional[object] = None
    dispatch: Optional[object] = None  # the MoE dispatch strategy (layers/moe.py); None = local

    @nn.compact
    def __call__(self, h_prev_btd: jax.Array, emb_next_btd: jax.Array, positions_bt: jax.Array, cache=None,
                 absorb: bool = False):
        """Returns (h_k [B, T, d] (pre-norm block output), normed_k [B, T, d] (input to the shared head), aux).

        With ``cache`` (this module's own one-layer attention cache; generate.py's speculative decoding) the block
        attends over it (slot == position, ``absorb`` selects the absorbed MLA path) and a 4th element, the
        updated cache, is returned."""
        cfg = self.cfg
        e = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="enorm")(emb_next_btd)
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="hnorm")(h_prev_btd)
        x = Dense(cfg.hidden_size, (None, "embed"), cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                  name="eh_proj")(jax.numpy.concatenate([e, h], axis=-1))
        x, (aux, new_cache) = self.block_cls(cfg, moe=cfg.is_moe_layer(self.layer_idx), absorb=absorb,
                                             dot_general=self.dot_general, dispatch=self.dispatch,
                                             name="block")(x, positions_bt, cache)
        normed = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="head_norm")(x)
        if cache is not None:
            return x, normed, aux, new_cache
        return x, normed, aux
