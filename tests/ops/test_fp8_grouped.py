"""Grouped FP8 GEMMs for the routed experts (ops/fp8_grouped.py; docs/fp8.md "Grouped GEMMs"): each kernel form,
interpreted, against float64 numpy per-tile / per-expert references; the grouped custom-VJP linear against the
dense FP8 linear applied expert by expert; the grouped dispatch against the per-tile FP8 dispatch; and lowering
for cuda (Triton) and tpu (Mosaic TPU) at DeepSeek-V3's routed-expert shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import Fp8Config
from deepseek_jax.ops import fp8, fp8_grouped, moe_dispatch
from tests.ops.lowering_util import MOSAIC_TPU, TRITON, count_calls, export_text

FORMS = [dict(kernel="interpret"), dict(kernel="mosaic_tpu", interpret=True)]
FORM_IDS = ["triton-interpreted", "mosaic_tpu-interpreted"]
TILE_E = np.asarray([0, 2, 2], np.int32)  # 3 row tiles of 128; expert 1 has no rows


def _deq(q, s, block):
    return np.asarray(fp8.dequantize(q, s, block), np.float64)


def _max_rel(out, ref):
    return np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_grouped_gemm_equals_per_tile_float64(form):
    r = np.random.RandomState(0)
    E, P, N, K = 3, 384, 72, 200  # N, K not multiples of the blocks
    a_q, a_s = fp8.quantize(jnp.asarray(r.normal(size=(P, K)), jnp.float32), (1, 128))
    b = jnp.asarray(r.normal(size=(E, N, K)) * 0.1, jnp.float32)
    b_q, b_s = jax.vmap(lambda w: fp8.quantize(w, (128, 128)))(b)
    out = fp8_grouped.grouped_gemm(jnp.asarray(TILE_E), a_q, a_s, b_q, b_s, **form)
    a = _deq(a_q, a_s, (1, 128))
    ref = np.concatenate([a[128 * t:128 * (t + 1)] @ _deq(b_q[e], b_s[e], (128, 128)).T
                          for t, e in enumerate(TILE_E)])
    assert out.shape == (P, N) and _max_rel(out, ref) < 1e-6


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_grouped_wgrad_equals_per_expert_float64(form):
    r = np.random.RandomState(1)
    E, P, M, N = 3, 384, 40, 72
    a_q, a_s = fp8.quantize(jnp.asarray(r.normal(size=(M, P)), jnp.float32), (1, 128))
    b_q, b_s = fp8.quantize(jnp.asarray(r.normal(size=(N, P)), jnp.float32), (1, 128))
    out = np.asarray(fp8_grouped.grouped_wgrad(jnp.asarray(TILE_E), E, a_q, a_s, b_q, b_s, **form))
    a, b = _deq(a_q, a_s, (1, 128)), _deq(b_q, b_s, (1, 128))
    rows = np.repeat(TILE_E, 128)
    ref = np.stack([a[:, rows == e] @ b[:, rows == e].T for e in range(E)])
    assert out.shape == (E, M, N) and (out[1] == 0).all()
    assert _max_rel(out, ref) < 1e-6


def test_grouped_linear_equals_the_fp8_linear_expert_by_expert():
    """Y, dX, dW of the grouped linear == fp8_linear (XLA reference) on each expert's rows: the same
    quantization everywhere, since every 128-row tile belongs to one expert."""
    r = np.random.RandomState(2)
    E, P, K, N = 3, 384, 200, 72
    x = jnp.asarray(r.normal(size=(P, K)), jnp.float32)
    w = jnp.asarray(r.normal(size=(E, K, N)) * 0.1, jnp.float32)
    dy = jnp.asarray(r.normal(size=(P, N)), jnp.float32)
    cfg = Fp8Config(backend="pallas", kernel="mosaic_tpu", interpret=True)
    y, vjp = jax.vjp(lambda x, w: fp8_grouped.fp8_grouped_linear(x, w, jnp.asarray(TILE_E), cfg), x, w)
    dx, dw = vjp(dy)
    rows = np.repeat(TILE_E, 128)
    y_r, dx_r, dw_r = np.zeros((P, N)), np.zeros((P, K)), np.zeros((E, K, N))
    for e in (0, 2):
        m = rows == e
        ye, vj = jax.vjp(lambda x, w: fp8.fp8_linear(x, w, Fp8Config()), x[m], w[e])
        y_r[m], (dx_r[m], dw_r[e]) = ye, vj(dy[m])
    for got, want in ((y, y_r), (dx, dx_r), (dw, dw_r)):
        assert _max_rel(got, want) < 1e-5
    assert float(jnp.abs(dw[1]).max()) == 0.0


def test_grouped_dispatch_equals_the_per_tile_fp8_dispatch():
    r = np.random.RandomState(3)
    N, d, F, E, K = 40, 64, 32, 4, 2
    x = jnp.asarray(r.normal(size=(N, d)), jnp.float32)
    wg, wu = (jnp.asarray(r.normal(size=(E, d, F)) * 0.1, jnp.float32) for _ in range(2))
    wd = jnp.asarray(r.normal(size=(E, F, d)) * 0.1, jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(E, K, replace=False) for _ in range(N)]), jnp.int32)
    gw = jnp.asarray(r.uniform(size=(N, K)), jnp.float32)
    grouped = fp8_grouped.grouped_linear_fn(Fp8Config(backend="pallas", kernel="mosaic_tpu", interpret=True))
    tiles = fp8.Fp8DotGeneral(Fp8Config()).linear_fn

    def loss(fn, lin, x, wg, wu, wd):
        return jnp.sum(fn(x, idx, gw, wg, wu, wd, 128, lin) ** 2)

    args = (x, wg, wu, wd)
    v_g, g_g = jax.value_and_grad(lambda *a: loss(moe_dispatch.dispatch_fp8_grouped, grouped, *a), (0, 1, 2, 3))(*args)
    v_t, g_t = jax.value_and_grad(lambda *a: loss(moe_dispatch.dispatch_fp8_tiles, tiles, *a), (0, 1, 2, 3))(*args)
    assert abs(float(v_g) - float(v_t)) <= 1e-5 * abs(float(v_t))
    for a, b in zip(g_g, g_t):
        assert _max_rel(a, np.asarray(b, np.float64)) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Lowering at V3's routed-expert shapes: 4096 routed rows on 8 local experts, d = 7168, expert FFN width 2048
# ---------------------------------------------------------------------------------------------------------------
def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


F8 = jnp.float8_e4m3fn
E8, P_ROWS, D, FF = 8, 4096, 7168, 2048
GEMMS = {  # name: (fn, abstract args); the Dgrads have the Fprops' shapes with the roles of D and FF swapped
    "fprop_gate": (lambda k, i: lambda te, a, sa, b, sb: fp8_grouped.grouped_gemm(te, a, sa, b, sb, kernel=k,
                                                                                     interpret=i),
                   (_sds((P_ROWS // 128,), jnp.int32), _sds((P_ROWS, D), F8), _sds((P_ROWS, D // 128)),
                    _sds((E8, FF, D), F8), _sds((E8, FF // 128, D // 128)))),
    "fprop_down": (lambda k, i: lambda te, a, sa, b, sb: fp8_grouped.grouped_gemm(te, a, sa, b, sb, kernel=k,
                                                                                     interpret=i),
                   (_sds((P_ROWS // 128,), jnp.int32), _sds((P_ROWS, FF), F8), _sds((P_ROWS, FF // 128)),
                    _sds((E8, D, FF), F8), _sds((E8, D // 128, FF // 128)))),
    "wgrad_gate": (lambda k, i: lambda te, a, sa, b, sb: fp8_grouped.grouped_wgrad(te, E8, a, sa, b, sb, kernel=k,
                                                                                      interpret=i),
                   (_sds((P_ROWS // 128,), jnp.int32), _sds((D, P_ROWS), F8), _sds((D, P_ROWS // 128)),
                    _sds((FF, P_ROWS), F8), _sds((FF, P_ROWS // 128)))),
}


@pytest.mark.parametrize("gemm", sorted(GEMMS))
@pytest.mark.parametrize("platform,kernel,target", [("cuda", "triton", TRITON), ("tpu", "mosaic_tpu", MOSAIC_TPU),
                                                    ("cuda", "auto", TRITON), ("tpu", "auto", MOSAIC_TPU)])
def test_grouped_gemms_lower_at_v3_expert_shapes(gemm, platform, kernel, target):
    make, args = GEMMS[gemm]
    text = export_text(make(kernel, False), args, platform)
    assert count_calls(text, target) == 1
    assert "stablehlo.dot_general" not in text
