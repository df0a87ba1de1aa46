"""ModelConfig.attention_impl: the cuDNN fused-attention path (v padded to the q/k width, YaRN's softmax scale)
equals the einsum path, through the same jax.nn.dot_product_attention call with XLA's implementation (the only
one a CPU has); lowered for cuda it holds cuDNN's fused-attention custom calls, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from deepseek_jax import config
from deepseek_jax.layers import attention, rope


def _qkv(B=2, T=10, H=4, dn=16, dr=8, dv=16, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    return (jax.random.normal(ks[0], (B, T, H, dn), dtype), jax.random.normal(ks[1], (B, T, H, dr), dtype),
            jax.random.normal(ks[2], (B, T, H, dn), dtype), jax.random.normal(ks[3], (B, T, dr), dtype),
            jax.random.normal(ks[4], (B, T, H, dv), dtype))


def _assert_input_grads_close(fn, ref, args, key, atol):
    """Gradients of <fn(q_nope, q_rope, k_nope, k_rope, v), ct> wrt all five inputs == those of ``ref``."""
    ct = jax.random.normal(key, ref(*args).shape)
    loss = lambda f: (lambda *a: (f(*a) * ct).sum())
    g = jax.grad(loss(fn), argnums=tuple(range(5)))(*args)
    g_ref = jax.grad(loss(ref), argnums=tuple(range(5)))(*args)
    for name, a, b in zip(("q_nope", "q_rope", "k_nope", "k_rope", "v"), g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("T", [10, 7])  # odd T: one zero query/key appended (cuDNN's backward wants even)
def test_fused_core_equals_naive_core_values_and_grads(T):
    """_mla_fused_core (padding, scale, mask) through implementation="xla" == _naive_core, fp32, with a YaRN
    scale (mscale^2 != 1) and dv < dk."""
    cfg = config.preset("tiny", rope_scaling={"factor": 40.0, "original_max_position_embeddings": 4,
                                              "mscale": 1.0, "mscale_all_dim": 1.0})
    scale = rope.softmax_scale(cfg)
    assert scale != cfg.qk_head_dim ** -0.5
    args = _qkv(T=T)
    B = args[0].shape[0]
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    f32 = jnp.float32

    def fused(*a):
        return attention._mla_fused_core(*a, pos, scale, f32, implementation="xla")

    def naive(*a):
        return attention._naive_core(*a, pos, pos, scale, f32, 0)

    o, o_ref = fused(*args), naive(*args)
    assert o.shape == o_ref.shape == (B, T, 4, 16)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-5)
    _assert_input_grads_close(fused, naive, args, jax.random.PRNGKey(9), atol=1e-5)


def test_fused_attention_positions_not_increasing_give_nan():
    q_nope, q_rope, k_nope, k_rope, v = _qkv(T=6)
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    o = attention._mla_fused_core(q_nope, q_rope, k_nope, k_rope, v, pos, 0.2, jnp.float32, implementation="xla")
    assert np.isfinite(np.asarray(o[0])).all() and np.isnan(np.asarray(o[1])).all()


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_module_cudnn_path_equals_xla_path(kind, monkeypatch):
    """The whole module with attention_impl="cudnn" (bf16, as cuDNN needs) and the cuDNN call swapped for XLA's
    implementation of the same call == attention_impl="xla", values and parameter gradients."""
    kw = dict(dtype="bfloat16", initializer_range=0.2)
    if kind == "gqa":
        kw.update(attention="gqa", num_key_value_heads=2)
    cfg_x = config.preset("tiny", attention_impl="xla", **kw)
    cfg_c = cfg_x.replace(attention_impl="cudnn")
    mod_x, mod_c = attention.attention_class(cfg_x)(cfg_x), attention.attention_class(cfg_c)(cfg_c)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, cfg_x.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(12)[None], (2, 12))
    params = nn.meta.unbox(mod_x.init(jax.random.PRNGKey(1), x, pos))
    monkeypatch.setattr(attention, "CUDNN_IMPLEMENTATION", "xla")
    loss = lambda m: (lambda p: (m.apply(p, x, pos)[0].astype(jnp.float32) ** 2).sum())
    o_x, o_c = mod_x.apply(params, x, pos)[0], mod_c.apply(params, x, pos)[0]
    assert o_c.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o_c, np.float32), np.asarray(o_x, np.float32), rtol=2e-2, atol=2e-2)
    g_x, g_c = jax.grad(loss(mod_x))(params), jax.grad(loss(mod_c))(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_c)[0], jax.tree_util.tree_leaves(g_x)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max() + 1e-6, jax.tree_util.keystr(path)


def test_resolve_attention_impl_on_cpu():
    cfg = config.preset("tiny")
    assert cfg.attention_impl == "auto"
    assert attention.resolve_attention_impl(cfg, False) == "xla"  # auto on a CPU
    assert attention.resolve_attention_impl(cfg.replace(attn_chunk=4), False) == "chunked"
    cud = cfg.replace(attention_impl="cudnn", dtype="bfloat16")
    assert attention.resolve_attention_impl(cud, False) == "cudnn"
    assert attention.resolve_attention_impl(cud, True) == "xla"  # a cache (prefill) keeps the einsum path


@pytest.mark.parametrize("changes,field", [
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(attention_impl="cudnn"), "attention_impl"),  # tiny is fp32
    (dict(attention_impl="cudnn", dtype="bfloat16", qk_nope_head_dim=256), "attention_impl"),
    (dict(attention_impl="chunked"), "attn_chunk"),
    (dict(attention_impl="xla", attn_chunk=8), "attn_chunk"),
])
def test_attention_impl_validation(changes, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        config.preset("tiny", **changes)


def test_cudnn_lowers_to_fused_attention_custom_calls(monkeypatch):
    """MLA with attention_impl="cudnn", forward and gradient, lowered for cuda on this CPU host: cuDNN's forward and
    backward fused-attention custom calls are in the module. jax checks the cuDNN version and the GPU's compute
    capability while tracing; both are stubbed here, for this test only (cuDNN 9.10, a Hopper GPU)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    cfg = config.preset("tiny", dtype="bfloat16", param_dtype="bfloat16", attention_impl="cudnn")
    mla = attention.MLA(cfg)
    B, T = 2, 16
    x = jax.ShapeDtypeStruct((B, T, cfg.hidden_size), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)
    params = jax.eval_shape(lambda: nn.meta.unbox(mla.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                                           jnp.zeros(pos.shape, jnp.int32))))
    fwd = lambda p, x, pos: mla.apply(p, x, pos)[0]
    grad = jax.grad(lambda p, x, pos: fwd(p, x, pos).astype(jnp.float32).sum())
    txt_f = jax.jit(fwd).trace(params, x, pos).lower(lowering_platforms=("cuda",)).as_text()
    txt_g = jax.jit(grad).trace(params, x, pos).lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmhaSoftmax" in txt_f and "Backward" not in txt_f
    assert "__cudnn$fmhaSoftmaxBackward" in txt_g
    H = cfg.num_attention_heads
    assert f"tensor<{B}x{H}x{T}x{T}xf32>" not in txt_f + txt_g  # no [B, H, T, S] scores anywhere


def test_auto_picks_cudnn_on_a_gpu_where_shapes_allow(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_gpu_compute_capability", lambda: (9, 0))
    bf16 = config.preset("tiny", dtype="bfloat16")  # qk_head_dim 24
    assert attention.resolve_attention_impl(bf16, False) == "cudnn"
    assert attention.resolve_attention_impl(bf16, True) == "xla"  # a cache: einsum core
    assert attention.resolve_attention_impl(config.preset("tiny"), False) == "xla"  # fp32: cuDNN needs bf16/fp16
    v3 = config.preset("deepseek-v3-671b", dtype="bfloat16")  # qk_head_dim 192: Hopper or later
    assert attention.resolve_attention_impl(v3, False) == "cudnn"
    monkeypatch.setattr(attention, "_gpu_compute_capability", lambda: (8, 0))
    assert attention.resolve_attention_impl(v3, False) == "xla"
    assert attention.resolve_attention_impl(bf16, False) == "cudnn"


@pytest.mark.parametrize("T, n", [(12, 4), (10, 4), (9, 2)])
def test_causal_query_blocks_equal_the_whole_core(T, n):
    """_naive_core with causal_blocks (the training path: query blocks that skip the scores above the diagonal)
    == the whole [T, T] core, values and the gradients of all five inputs, T divisible by n or not."""
    args = _qkv(T=T)
    B = args[0].shape[0]
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    f32 = jnp.float32
    whole = lambda *a: attention._naive_core(*a, pos, pos, 0.3, f32, 0)
    blocked = lambda *a: attention._naive_core(*a, pos, pos, 0.3, f32, 0, causal_blocks=n)
    np.testing.assert_allclose(np.asarray(blocked(*args)), np.asarray(whole(*args)), rtol=1e-6, atol=1e-6)
    _assert_input_grads_close(blocked, whole, args, jax.random.PRNGKey(3), atol=1e-6)


def test_causal_query_blocks_poison_rows_whose_positions_do_not_increase():
    """A row whose positions decrease would see keys the blocks skip: its skipped-from blocks are NaN (never a
    silently different softmax); an increasing row is exact."""
    q_nope, q_rope, k_nope, k_rope, v = _qkv(T=8)
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    f32 = jnp.float32
    o = attention._naive_core(q_nope, q_rope, k_nope, k_rope, v, pos, pos, 0.3, f32, 0, causal_blocks=2)
    ref = attention._naive_core(q_nope, q_rope, k_nope, k_rope, v, pos, pos, 0.3, f32, 0)
    np.testing.assert_allclose(np.asarray(o[0]), np.asarray(ref[0]), rtol=1e-6, atol=1e-6)
    assert np.isnan(np.asarray(o[1, :4])).all() and np.isfinite(np.asarray(o[1, 4:])).all()
