import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config
from deepseek_jax.config import YarnConfig
from deepseek_jax.layers import rope
from deepseek_jax.layers.norms import RMSNorm


def _official_yarn_freqs(dim, base, factor, orig, beta_fast, beta_slow):
    """DeepSeek-V3 inference/model.py precompute_freqs_cis (long-context branch), in float64."""
    def corr_dim(n):
        return dim * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    freqs = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
    return freqs / factor * (1 - smooth) + freqs * smooth


def test_yarn_inv_freq_matches_official_formula():
    for dim, factor, orig in [(64, 40.0, 4096), (8, 4.0, 256), (16, 8.0, 16)]:
        y = YarnConfig(factor=factor, original_max_position_embeddings=orig)
        ours = rope.inv_frequencies(dim, 10000.0, y)
        np.testing.assert_allclose(ours, _official_yarn_freqs(dim, 10000.0, factor, orig, 32, 1), rtol=2e-6)
    np.testing.assert_allclose(rope.inv_frequencies(8, 10000.0, None), 1 / 10000 ** (np.arange(0, 8, 2) / 8),
                               rtol=1e-6)


def test_softmax_scale_closed_form():
    cfg = config.preset("deepseek-v3-671b")
    expected = 192 ** -0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert math.isclose(rope.softmax_scale(cfg), expected, rel_tol=1e-12)
    assert rope.attention_factor(cfg.rope_scaling) == 1.0  # mscale == mscale_all_dim
    assert math.isclose(rope.softmax_scale(cfg.replace(rope_scaling=None)), 192 ** -0.5)
    # transformers' rule when mscale keys are absent: cos/sin scaled by 0.1 ln(s) + 1, softmax scale untouched.
    bare = YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=None, mscale_all_dim=None)
    assert math.isclose(rope.attention_factor(bare), 0.1 * math.log(4) + 1)


def test_rope_rotates_adjacent_pairs_as_complex_numbers():
    cfg = config.preset("tiny")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, cfg.qk_rope_head_dim)).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 300], [5, 6, 9, 10, 11]])
    cos, sin = rope.rope_cos_sin(cfg, jnp.asarray(pos))
    ours = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin))
    inv = rope.inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    af = rope.attention_factor(cfg.rope_scaling)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * np.exp(1j * pos[:, :, None, None] * inv) * af
    ref = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = config.preset("tiny", rope_scaling=None)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 1, cfg.qk_rope_head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, cfg.qk_rope_head_dim)), jnp.float32)

    def score(m, n):
        cq, sq = rope.rope_cos_sin(cfg, jnp.array([[m]]))
        ck, sk = rope.rope_cos_sin(cfg, jnp.array([[n]]))
        return float((rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)).sum())

    assert abs(score(10, 3) - score(107, 100)) < 1e-4
    assert abs(score(10, 3) - score(10, 4)) > 1e-3


def test_rmsnorm_formula_and_dtype():
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32) * 5
    norm = RMSNorm(eps=1e-6)
    v = norm.init(jax.random.PRNGKey(0), jnp.asarray(x))
    v = jax.tree_util.tree_map(lambda a: a * 0 + np.linspace(0.5, 2, 16, dtype=np.float32), v)
    v = jax.tree_util.tree_map(lambda a: a.value if hasattr(a, "value") else a, v,
                               is_leaf=lambda a: hasattr(a, "value"))
    ref = np.linspace(0.5, 2, 16) * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(norm.apply(v, jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)
    out = norm.apply(v, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
