"""MLA: absorbed == naive, latent-cache decoding == full attention, and an independent per-head reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from deepseek_jax import config
from deepseek_jax.layers import attention, rope


@pytest.fixture(scope="module", params=["q_lora", "no_q_lora"])
def setup(request):
    cfg = config.preset("tiny", initializer_range=0.2)
    if request.param == "no_q_lora":
        cfg = cfg.replace(q_lora_rank=None, rope_scaling=None)
    mla = attention.MLA(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(12)[None], (2, 12))
    params = nn.meta.unbox(mla.init(jax.random.PRNGKey(1), x, pos))
    return cfg, mla, params, x, pos


def _reference_mla(cfg, p, x, pos):
    """Per-head MHA with explicit keys/values built from the latent (numpy, float64)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p["params"])
    x = np.asarray(x, np.float64)
    H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)

    def rms(v, w):
        return w * v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6)

    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]["kernel"]
    else:
        q = rms(x @ p["q_a_proj"]["kernel"], p["q_a_norm"]["scale"]) @ p["q_b_proj"]["kernel"]
    B, T, _ = x.shape
    q = q.reshape(B, T, H, dn + dr)
    kv_a = x @ p["kv_a_proj"]["kernel"]
    c = rms(kv_a[..., :r], p["kv_a_norm"]["scale"])
    kv = (c @ p["kv_b_proj"]["kernel"]).reshape(B, T, H, dn + dv)
    inv = rope.inv_frequencies(dr, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    af = rope.attention_factor(cfg.rope_scaling)

    def rot(v):  # adjacent pairs as complex numbers
        z = v[..., 0::2] + 1j * v[..., 1::2]
        ang = np.asarray(pos)[:, :, None] * inv
        if z.ndim == 4:
            ang = ang[:, :, None, :]
        z = z * np.exp(1j * ang) * af
        return np.stack([z.real, z.imag], -1).reshape(v.shape)

    k = np.concatenate([kv[..., :dn], np.broadcast_to(rot(kv_a[..., r:])[:, :, None], (B, T, H, dr))], -1)
    qq = np.concatenate([q[..., :dn], rot(q[..., dn:])], -1)
    s = np.einsum("bthd,bshd->bhts", qq, k) * rope.softmax_scale(cfg)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", a, kv[..., dn:]).reshape(B, T, H * dv)
    return o @ p["o_proj"]["kernel"]


def test_naive_matches_independent_reference(setup):
    cfg, mla, params, x, pos = setup
    out, _ = mla.apply(params, x, pos)
    ref = _reference_mla(cfg, params, x, pos)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_absorbed_equals_naive(setup):
    cfg, mla, params, x, pos = setup
    naive, _ = mla.apply(params, x, pos, absorb=False)
    absorbed, _ = mla.apply(params, x, pos, absorb=True)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(naive), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5])  # 12 queries: 3 whole chunks; 3 chunks with 3 padding rows
def test_query_chunked_attention_same_values_and_gradients(setup, chunk):
    """cfg.attn_chunk (queries in rematerialised chunks, for memory): the independent reference's values, and the
    unchunked gradients w.r.t. the input and every parameter; also through a cache prefill."""
    cfg, mla, params, x, pos = setup
    chunked = attention.MLA(cfg.replace(attn_chunk=chunk))
    out, _ = chunked.apply(params, x, pos)
    np.testing.assert_allclose(np.asarray(out), _reference_mla(cfg, params, x, pos), rtol=1e-4, atol=1e-5)

    def loss(m):
        return lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x, pos)[0]) * jnp.cos(jnp.arange(x.shape[-1])))
    g_ref = jax.grad(loss(mla), argnums=(0, 1))(params, x)
    g = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(params, x)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree_util.tree_leaves(g_ref)):
        a, b = np.asarray(a), np.asarray(b)  # per tensor, relative to its norm (fp32 reordering noise only)
        assert np.linalg.norm(b) > 0 and np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), jax.tree_util.keystr(path)
    cache = attention.init_layer_cache(cfg, 2, 16)
    pre, _ = chunked.apply(params, x[:, :10], pos[:, :10], cache)  # naive path over the 16 cache slots
    np.testing.assert_allclose(np.asarray(pre), np.asarray(out[:, :10]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("absorb", [True, False])
def test_latent_cache_decoding_equals_full_attention(setup, absorb):
    cfg, mla, params, x, pos = setup
    full, _ = mla.apply(params, x, pos)
    cache = attention.init_layer_cache(cfg, 2, 16)
    prefill = 5
    out, cache = mla.apply(params, x[:, :prefill], pos[:, :prefill], cache, absorb=absorb)
    outs = [out]
    for t in range(prefill, 12):
        o, cache = mla.apply(params, x[:, t:t + 1], pos[:, t:t + 1], cache, absorb=absorb)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    # The cache holds exactly the normalized latent and the rotated shared rope key, nothing per head.
    assert set(cache) == {"c_kv", "k_rope"}
    assert cache["c_kv"].shape == (2, 16, cfg.kv_lora_rank) and cache["k_rope"].shape == (2, 16, cfg.qk_rope_head_dim)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_cache_bytes_per_token_per_layer(dtype, itemsize):
    cfg = config.preset("tiny")
    cache = attention.init_layer_cache(cfg, batch_size=3, max_len=7, dtype=dtype)
    nbytes = sum(a.nbytes for a in cache.values())
    assert nbytes / (3 * 7) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize


def test_mixed_positions_per_row(setup):
    """Rows of a batch at different positions (different prompt lengths) decode independently."""
    cfg, mla, params, x, pos = setup
    full, _ = mla.apply(params, x, pos)
    cache = attention.init_layer_cache(cfg, 2, 16)
    # Row 0 prefilled with 6 tokens, row 1 with 3 (its extra prefill slots are overwritten later).
    _, cache = mla.apply(params, x[:, :6], pos[:, :6], cache)
    rows = jnp.array([[6], [3]])
    xs = jnp.stack([x[0, 6], x[1, 3]])[:, None]
    o, cache = mla.apply(params, xs, rows, cache)
    np.testing.assert_allclose(np.asarray(o[0, 0]), np.asarray(full[0, 6]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o[1, 0]), np.asarray(full[1, 3]), rtol=1e-5, atol=1e-5)
