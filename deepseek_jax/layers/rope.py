"""Rotary position embedding in the released weights' layout, with YaRN.

Layout: DeepSeek's reference code treats the rope dims as complex numbers, rotating adjacent pairs
(x[2i], x[2i+1]) by frequency i. The "rotate half" pairing (x[i], x[i + d/2]) is wrong for the released
weights (docs/checkpoint_format.md). transformers' ``apply_rotary_pos_emb_interleave`` computes the same rotation and
writes the result de-interleaved; attention scores are identical either way because q and k are permuted
alike, so here the output stays in the input's interleaved order.

YaRN (arXiv 2309.00071) follows transformers' ``_compute_yarn_parameters`` exactly (which applies the
frequency blend whenever rope_scaling is set; DeepSeek's own inference code applies it only when the served
length exceeds the original one - released configs always serve the long length, so both agree there).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, YarnConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 for scale > 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_range(y: YarnConfig, dim: int, base: float) -> Tuple[float, float]:
    def corr_dim(num_rot):
        return dim * math.log(y.original_max_position_embeddings / (num_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inv_frequencies(dim: int, base: float, yarn: Optional[YarnConfig]) -> np.ndarray:
    """Inverse frequencies [dim/2] (float32, computed as transformers does in float32)."""
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrap = (1.0 / pos_freqs).astype(np.float32)
    if yarn is None:
        return inv_extrap
    inv_interp = (1.0 / (np.float32(yarn.factor) * pos_freqs)).astype(np.float32)
    low, high = _correction_range(yarn, dim, base)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrap_factor = (1 - ramp).astype(np.float32)
    return (inv_interp * (1 - extrap_factor) + inv_extrap * extrap_factor).astype(np.float32)


def attention_factor(yarn: Optional[YarnConfig]) -> float:
    """The factor transformers multiplies cos and sin by (1.0 without YaRN)."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return float(yarn.attention_factor)
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_get_mscale(yarn.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (V3 §4.3; docs/checkpoint_format.md)."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.rope_scaling
    if y is not None and y.mscale_all_dim:
        m = yarn_get_mscale(y.factor, y.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(cfg: ModelConfig, positions_bt: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, rope_dim/2] (fp32) for integer positions [B, T]."""
    inv = jnp.asarray(inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv
    af = attention_factor(cfg.rope_scaling)
    return jnp.cos(angles) * af, jnp.sin(angles) * af


def apply_rope(x: jax.Array, cos_btf: jax.Array, sin_btf: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of the last axis. x: [B, T, ..., dr]; cos/sin: [B, T, dr/2]."""
    extra = x.ndim - 3
    cos = cos_btf.reshape(cos_btf.shape[:2] + (1,) * extra + cos_btf.shape[2:])
    sin = sin_btf.reshape(sin_btf.shape[:2] + (1,) * extra + sin_btf.shape[2:])
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return jnp.stack([o1, o2], axis=-1).reshape(x.shape).astype(x.dtype)
