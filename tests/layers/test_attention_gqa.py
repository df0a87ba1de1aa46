"""MHA/GQA (the attention ablation's baseline): forward vs an independent float64 reference, cached decoding vs
full attention, KV-cache arithmetic, parameter counts by hand, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from deepseek_jax import config, generate, model
from deepseek_jax.layers import attention, rope


def _cfg(kind, kv_heads=None, q_lora=True):
    cfg = config.preset("tiny", initializer_range=0.2, attention=kind, num_key_value_heads=kv_heads)
    return cfg if q_lora else cfg.replace(q_lora_rank=None, rope_scaling=None)


@pytest.fixture(scope="module", params=[("mha", None, True), ("gqa", 2, True), ("gqa", 1, False)],
                ids=["mha", "gqa2", "mqa_no_qlora"])
def setup(request):
    cfg = _cfg(*request.param)
    mod = attention.GQA(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(10)[None], (2, 10))
    params = nn.meta.unbox(mod.init(jax.random.PRNGKey(1), x, pos))
    return cfg, mod, params, x, pos


def _reference(cfg, p, x, pos):
    """Textbook attention, float64, one head at a time, KV heads repeated by explicit indexing."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p["params"])
    x = np.asarray(x, np.float64)
    H, G, dn, dr, dv = (cfg.num_attention_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    B, T, _ = x.shape
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]["kernel"]
    else:
        c = x @ p["q_a_proj"]["kernel"]
        c = p["q_a_norm"]["scale"] * c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-6)
        q = c @ p["q_b_proj"]["kernel"]
    q = q.reshape(B, T, H, dn + dr)
    k = (x @ p["k_proj"]["kernel"]).reshape(B, T, G, dn + dr)
    v = (x @ p["v_proj"]["kernel"]).reshape(B, T, G, dv)
    inv = rope.inv_frequencies(dr, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    af = rope.attention_factor(cfg.rope_scaling)

    def rot(a):  # rotate the last dr dims, adjacent pairs as complex numbers
        z = a[..., dn::2] + 1j * a[..., dn + 1::2]
        z = z * np.exp(1j * np.asarray(pos)[:, :, None, None] * inv) * af
        return np.concatenate([a[..., :dn], np.stack([z.real, z.imag], -1).reshape(a.shape[:-1] + (dr,))], -1)

    q, k = rot(q), rot(k)
    out = np.zeros((B, T, H, dv))
    for h in range(H):
        g = h // (H // G)
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) * rope.softmax_scale(cfg)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsv->btv", a, v[:, :, g])
    return out.reshape(B, T, H * dv) @ p["o_proj"]["kernel"]


def test_forward_matches_independent_reference(setup):
    cfg, mod, params, x, pos = setup
    out, cache = mod.apply(params, x, pos)
    ref = _reference(cfg, params, x, pos)
    assert cache is None and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_cached_decoding_equals_full_attention(setup):
    cfg, mod, params, x, pos = setup
    full, _ = mod.apply(params, x, pos)
    cache = attention.init_layer_cache(cfg, 2, 16)
    out, cache = mod.apply(params, x[:, :4], pos[:, :4], cache)
    outs = [out]
    for t in range(4, 10):
        o, cache = mod.apply(params, x[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, kv_heads", [("mla", None), ("mha", None), ("gqa", 2), ("gqa", 1)])
@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_kv_cache_bytes_per_token(kind, kv_heads, dtype, itemsize):
    cfg = _cfg(kind, kv_heads)
    dk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    per_layer = {"mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "mha": 4 * (dk + dv),
                 "gqa": (kv_heads or 0) * (dk + dv)}[kind]
    assert cfg.kv_cache_elements_per_token_per_layer == per_layer
    assert cfg.kv_cache_bytes_per_token(dtype) == per_layer * cfg.num_hidden_layers * itemsize
    cache = generate.init_cache(cfg, batch_size=3, max_len=7, dtype=dtype)
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(cache))
    assert nbytes / (3 * 7) == cfg.kv_cache_bytes_per_token(dtype)


def test_kv_cache_v3_scale_arithmetic():
    """V3 671B: MLA 576 elements/layer; the MHA variant 128 heads x (192 + 128) = 40,960 (generate.py's figure)."""
    v3 = config.preset("deepseek-v3-671b")
    assert v3.kv_cache_bytes_per_token("bfloat16") == 576 * 61 * 2
    assert v3.replace(attention="mha").kv_cache_elements_per_token_per_layer == 40_960
    assert v3.replace(attention="gqa", num_key_value_heads=8).kv_cache_elements_per_token_per_layer == 2_560


@pytest.mark.parametrize("kind, kv_heads", [("mha", None), ("gqa", 2)])
def test_count_params_by_hand(kind, kv_heads):
    """Swapping MLA for GQA changes exactly the KV projections of every layer (main and MTP)."""
    mla, other = config.preset("tiny"), config.preset("tiny", attention=kind, num_key_value_heads=kv_heads)
    d, H, G = mla.hidden_size, mla.num_attention_heads, other.kv_heads
    dn, dr, dv, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    mla_kv = d * (r + dr) + r + r * H * (dn + dv)  # kv_a_proj, kv_a_norm, kv_b_proj
    gqa_kv = d * G * (dn + dr) + d * G * dv  # k_proj, v_proj
    a, b = model.count_params(mla), model.count_params(other)
    L, D = mla.num_hidden_layers, mla.num_nextn_predict_layers
    assert b["total"] - a["total"] == L * (gqa_kv - mla_kv)
    assert b["activated"] - a["activated"] == L * (gqa_kv - mla_kv)
    assert b["mtp"] - a["mtp"] == D * (gqa_kv - mla_kv)


def test_transformer_with_gqa_decodes_like_full_forward():
    cfg = config.preset("tiny", attention="gqa", num_key_value_heads=2, num_hidden_layers=2, moe_dispatch="dense",
                        num_nextn_predict_layers=0)
    net = model.Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), tokens)))
    leaves, tree = jax.tree_util.tree_flatten(shapes)  # random variables without model.init's compile
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    variables = jax.tree_util.tree_unflatten(tree, [0.1 * jax.random.normal(k, s.shape, s.dtype)
                                                    for k, s in zip(keys, leaves)])
    apply = jax.jit(net.apply)
    full = apply(variables, tokens).logits
    cache = generate.init_cache(cfg, 1, 8)
    pos = jnp.arange(8)[None]
    out = apply(variables, tokens[:, :5], pos[:, :5], cache)
    step = apply(variables, tokens[:, 5:], pos[:, 5:], out.cache)
    got = jnp.concatenate([out.logits, step.logits], 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes, match", [
    (dict(attention="linear"), r"ModelConfig\.attention\b"),
    (dict(attention="gqa"), r"ModelConfig\.num_key_value_heads\b"),
    (dict(attention="gqa", num_key_value_heads=3), r"ModelConfig\.num_key_value_heads\b"),
    (dict(attention="mha", num_key_value_heads=2), r"ModelConfig\.num_key_value_heads\b"),
    (dict(attention="mla", num_key_value_heads=2), r"ModelConfig\.num_key_value_heads\b"),
])
def test_bad_attention_config_names_field(changes, match):
    with pytest.raises(ValueError, match=match):
        config.preset("tiny", **changes)


def test_hf_bridge_ignores_kv_heads_and_refuses_non_mla():
    cfg = config.preset("tiny")
    back = config.ModelConfig.from_hf(cfg.to_hf())  # to_hf writes num_key_value_heads = H; MLA must ignore it
    assert back.attention == "mla" and back.num_key_value_heads is None
    with pytest.raises(ValueError, match=r"ModelConfig\.attention"):
        cfg.replace(attention="mha").to_hf()
