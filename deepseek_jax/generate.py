"""Decoding from the latent cache.

The cache holds, per main-model layer, only what MLA needs to rebuild keys and values: the normalized latent
c_kv and the rotated shared rope key (kv_lora_rank + qk_rope_head_dim numbers per token per layer; 576 for V3,
where multi-head attention would hold 40,960). ``Transformer.apply(variables, tokens, positions, cache)`` writes
the new tokens' latents at their positions and attends through the absorbed path.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.attention import init_layer_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype="float32") -> Dict[str, Any]:
    """Latent KV cache for every main-model layer: {"dense"|"moe": {"c_kv" [L, B, S, r], "k_rope" [L, B, S, dr]}}.
    Bytes per token per layer = (kv_lora_rank + qk_rope_head_dim) * itemsize."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    one = init_layer_cache(cfg, batch_size, max_len, dtype)
    out = {}
    for kind, n in (("dense", cfg.num_dense_layers), ("moe", cfg.num_moe_layers)):
        if n:
            out[kind] = jax.tree_util.tree_map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), one)
    return out
