"""Block-scaled FP8 (docs/fp8.md "What the tests hold", items 1-5): quantizers, the Pallas kernel (interpret mode)
against the dequantize-then-matmul reference, the limited-accumulation emulation, the custom-VJP linear against
an independent numpy implementation of the same recipe and against FP32 autodiff, and App. B.2's outlier case.

References are independent of the code under test: numpy + ml_dtypes quantizers written from the spec, float64
matmuls of the same fp8 values, closed-form truncations. Shapes are small (the kernel is interpreted on CPU)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.config import Fp8Config
from deepseek_jax.ops import fp8, fp8_pallas

E4M3 = ml_dtypes.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------------------
# numpy reference of the recipe (written from docs/fp8.md, sharing no code with ops/fp8.py)
# ---------------------------------------------------------------------------------------------------------------
def np_quantize(x, br, bc, fmax=448.0, dtype=E4M3, pow2=False):
    x = np.asarray(x, np.float32)
    R, C = x.shape
    q = np.zeros((R, C), dtype)
    s = np.zeros((-(-R // br), -(-C // bc)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            amax = np.abs(blk).max()
            sc = np.float32(amax) * np.float32(1.0 / fmax)  # the spec's amax / fmax, as fp32(1/fmax) (fp8.py)
            if pow2 and sc > 0:
                sc = np.float32(2.0 ** np.ceil(np.log2(np.float64(sc))))
            if sc == 0:
                sc = np.float32(1.0)
            s[i, j] = sc
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = np.clip(blk / sc, -fmax, fmax).astype(dtype)
    return q, s


def np_deq(q, s, br, bc):
    R, C = q.shape
    return q.astype(np.float64) * np.repeat(np.repeat(s.astype(np.float64), br, 0), bc, 1)[:R, :C]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def max_rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.abs(out - ref).max() / np.abs(ref).max()


# ---------------------------------------------------------------------------------------------------------------
# 1. Quantizers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(1, 128), (128, 1), (128, 128)])
def test_quantizer_shapes_range_roundtrip_and_numpy_equality(block):
    x = np.random.RandomState(0).normal(size=(200, 300)).astype(np.float32)  # not multiples of 128
    q, s = fp8.quantize(jnp.asarray(x), block)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (-(-200 // block[0]), -(-300 // block[1])) and s.dtype == jnp.float32
    qf = np.asarray(q.astype(jnp.float32))
    assert np.abs(qf).max() <= 448.0
    err = rel(fp8.dequantize(q, s, block), x)
    assert 0.005 < err < 0.05, err
    _, s_ref = np_quantize(x, *block)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    # The fp8 values are exactly numpy/ml_dtypes' round-to-nearest of x / s.
    s_el = np.repeat(np.repeat(np.asarray(s), block[0], 0), block[1], 1)[:200, :300]
    np.testing.assert_array_equal(qf, np.clip(x / s_el, -448, 448).astype(E4M3).astype(np.float32))


def test_zero_tiles_give_zeros_and_nonfinite_is_loud():
    x = np.random.RandomState(1).normal(size=(4, 384)).astype(np.float32)
    x[1, 128:256] = 0.0  # one all-zero 1x128 tile
    x[:, 256:] = 0.0  # an all-zero column of tiles
    for block in [(1, 128), (128, 128), (128, 1)]:
        q, s = fp8.quantize(jnp.asarray(x), block)
        d = np.asarray(fp8.dequantize(q, s, block))
        assert np.isfinite(d).all() and np.isfinite(np.asarray(s)).all()
        assert (d[x == 0] == 0).all()
    q, s = fp8.quantize(jnp.zeros((3, 128)), (1, 128))
    assert (np.asarray(q.astype(jnp.float32)) == 0).all() and (np.asarray(s) == 1).all()
    x[0, 0] = np.inf
    _, s = fp8.quantize(jnp.asarray(x), (1, 128))
    assert np.isnan(np.asarray(s)[0, 0]) and np.isfinite(np.asarray(s)[1:]).all()


def test_pow2_scales_and_e5m2():
    x = np.random.RandomState(2).normal(size=(130, 256)).astype(np.float32) * 3.7
    q, s = fp8.quantize(jnp.asarray(x), (1, 128), pow2=True)
    s = np.asarray(s)
    m, _ = np.frexp(s)
    assert (m == 0.5).all()  # exact powers of two
    amax = np.abs(x.reshape(130, 2, 128)).max(-1)
    assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()  # the next power of two above amax / 448
    assert 0.005 < rel(fp8.dequantize(q, s, (1, 128)), x) < 0.05
    q5, s5 = fp8.quantize(jnp.asarray(x), (1, 128), fmt="e5m2")
    assert q5.dtype == jnp.float8_e5m2 and np.abs(np.asarray(q5.astype(jnp.float32))).max() <= 57344
    e5 = rel(fp8.dequantize(q5, s5, (1, 128)), x)
    assert 0.01 < e5 < 0.1 and e5 > rel(fp8.dequantize(*fp8.quantize(jnp.asarray(x), (1, 128)), (1, 128)), x)
    with pytest.raises(ValueError, match="format"):
        fp8.quantize(jnp.asarray(x), (1, 128), fmt="e3m4")


# ---------------------------------------------------------------------------------------------------------------
# 2. Kernel (accum fp32) == dequantize-then-matmul, several grids
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemm_operands():
    r = np.random.RandomState(3)
    M, N, K = 256, 512, 384
    a = r.normal(size=(M, K)).astype(np.float32)
    b = r.normal(size=(N, K)).astype(np.float32) * 0.1
    a_q, a_s = np_quantize(a, 1, 128)
    b_q, b_s = np_quantize(b, 128, 128)
    ref = np_deq(a_q, a_s, 1, 128) @ np_deq(b_q, b_s, 128, 128).T
    return jnp.asarray(a_q), jnp.asarray(a_s), jnp.asarray(b_q), jnp.asarray(b_s), ref


@pytest.mark.parametrize("kw", [dict(), dict(bm=64, bn=256), dict(bm=32, bn=128, kernel="mosaic_tpu", interpret=True)])
def test_kernel_fp32_equals_reference(gemm_operands, kw):
    a_q, a_s, b_q, b_s, ref = gemm_operands
    out = fp8_pallas.fp8_gemm(a_q, a_s, b_q, b_s, **kw)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert max_rel(out, ref) < 1e-5


def test_kernel_ragged_shapes_and_row_scales():
    """M, N, K not multiples of the blocks; b in 1x128 tiles (per-row scales)."""
    r = np.random.RandomState(4)
    a, b = r.normal(size=(40, 200)).astype(np.float32), r.normal(size=(72, 200)).astype(np.float32)
    a_q, a_s = np_quantize(a, 1, 128)
    b_q, b_s = np_quantize(b, 1, 128)
    ref = np_deq(a_q, a_s, 1, 128) @ np_deq(b_q, b_s, 1, 128).T
    for form in (dict(kernel="interpret"), dict(kernel="mosaic_tpu", interpret=True)):
        out = fp8_pallas.fp8_gemm(jnp.asarray(a_q), jnp.asarray(a_s), jnp.asarray(b_q), jnp.asarray(b_s),
                                  bm=32, bn=64, **form)
        assert max_rel(out, ref) < 1e-5
    with pytest.raises(ValueError, match="b_s"):
        fp8_pallas.fp8_gemm(jnp.asarray(a_q), jnp.asarray(a_s), jnp.asarray(b_q), jnp.asarray(b_s[:, :1]))
    with pytest.raises(ValueError, match="promote_every"):
        fp8_pallas.fp8_gemm(jnp.asarray(a_q), jnp.asarray(a_s), jnp.asarray(b_q), jnp.asarray(b_s),
                            promote_every=256)


# ---------------------------------------------------------------------------------------------------------------
# 3. Limited-precision accumulation and promotion
# ---------------------------------------------------------------------------------------------------------------
def test_truncate_mantissa_closed_form():
    x = jnp.asarray([1 + 2.0 ** -13 + 2.0 ** -14, -(1 + 2.0 ** -13 + 2.0 ** -14), 3.0, 0.0], jnp.float32)
    out = np.asarray(fp8_pallas.truncate_mantissa(x, 14))
    np.testing.assert_array_equal(out, [1 + 2.0 ** -13, -(1 + 2.0 ** -13), 3.0, 0.0])  # toward zero
    assert float(fp8_pallas.truncate_mantissa(jnp.float32(1 + 2.0 ** -12), 12)) == 1.0


def _emulation_error(K, promote_every, bits=14):
    r = np.random.RandomState(5)
    a, b = r.normal(size=(16, K)).astype(np.float32), r.normal(size=(128, K)).astype(np.float32)
    a_q, a_s = np_quantize(a, 1, 128)
    b_q, b_s = np_quantize(b, 1, 128)
    ref = np_deq(a_q, a_s, 1, 128) @ np_deq(b_q, b_s, 1, 128).T  # float64 of the same fp8 values
    out = fp8_pallas.fp8_gemm(jnp.asarray(a_q), jnp.asarray(a_s), jnp.asarray(b_q), jnp.asarray(b_s),
                              accum="limited", mantissa_bits=bits, promote_every=promote_every)
    return max_rel(out, ref)


def test_promotion_bounds_the_limited_accumulation_error():
    promoted = {K: _emulation_error(K, 128) for K in (1024, 4096, 16384)}
    unpromoted = {K: _emulation_error(K, None) for K in (1024, 4096, 16384)}
    assert unpromoted[4096] > 10 * promoted[4096], (promoted, unpromoted)
    assert max(promoted.values()) < 2 * min(promoted.values()), promoted  # flat in K
    assert unpromoted[1024] < unpromoted[4096] < unpromoted[16384], unpromoted  # grows with K
    assert 1e-3 < unpromoted[4096] < 1e-2 and promoted[4096] < 5e-4  # docs/fp8.md's prototype: ~3e-3 and ~1e-4


# ---------------------------------------------------------------------------------------------------------------
# 4. The custom-VJP linear
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_case():
    r = np.random.RandomState(6)
    M, K, N = 256, 384, 256
    x = r.normal(size=(M, K)).astype(np.float32)
    w = (r.normal(size=(K, N)) * 0.05).astype(np.float32)
    dy = r.normal(size=(M, N)).astype(np.float32)
    return x, w, dy


def _np_recipe(x, w, dy, pow2):
    """Y, dX, dW of docs/fp8.md's table in numpy (float64 GEMMs of the fp8 values)."""
    xq, sx = np_quantize(x, 1, 128, pow2=pow2)
    wq, sw = np_quantize(w, 128, 128, pow2=pow2)
    y = np_deq(xq, sx, 1, 128) @ np_deq(wq, sw, 128, 128)
    dyq, sdy = np_quantize(dy, 1, 128, pow2=pow2)
    dx = np_deq(dyq, sdy, 1, 128) @ np_deq(wq, sw, 128, 128).T
    x_deq = np_deq(xq, sx, 1, 128).astype(np.float32)
    xq1, sx1 = np_quantize(x_deq, 128, 1, pow2=pow2)  # 128x1 tiles along tokens
    dyq1, sdy1 = np_quantize(dy, 128, 1, pow2=pow2)
    dw = np_deq(xq1, sx1, 128, 1).T @ np_deq(dyq1, sdy1, 128, 1)
    return y, dx, dw


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_equals_recipe_and_tracks_fp32(linear_case, pow2):
    x, w, dy = linear_case
    cfg = Fp8Config(pow2_scales=pow2)
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_linear(x, w, cfg), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    y_r, dx_r, dw_r = _np_recipe(x, w, dy, pow2)
    for got, want in ((y, y_r), (dx, dx_r), (dw, dw_r)):
        assert max_rel(got, want) < 1e-5
    # Against FP32 autodiff: a few percent (docs/fp8.md's prototype: Y 3.7%, dX 3.7%, dW 4.5% / 3.7% with pow2).
    x64, w64, dy64 = (v.astype(np.float64) for v in (x, w, dy))
    errs = (rel(y, x64 @ w64), rel(dx, dy64 @ w64.T), rel(dw, x64.T @ dy64))
    assert all(0.01 < e < 0.08 for e in errs), errs


def test_fp8_linear_residuals_are_fp8_and_it_works_under_jit_and_remat(linear_case):
    x, w, dy = (jnp.asarray(v) for v in linear_case)
    cfg = Fp8Config()
    _, res = fp8._fp8_linear_fwd(x, w, cfg)
    big = [r for r in res if r.size > max(x.size, w.size) // 64]  # everything but scales and dtype carriers
    assert len(big) == 2 and all(r.dtype == jnp.float8_e4m3fn for r in big)
    assert not any(r.shape in (x.shape, w.shape) and r.dtype != jnp.float8_e4m3fn for r in res)

    def loss(x, w):
        return jnp.sum(fp8.fp8_linear(x, w, cfg) * dy)

    g_eager = jax.grad(loss, (0, 1))(x, w)
    g_jit = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, w)
    for a, b in zip(g_eager, g_jit):
        assert max_rel(a, b) < 1e-6


def test_fp8_linear_pallas_backend_equals_xla(linear_case):
    x, w, dy = linear_case
    x, w, dy = jnp.asarray(x[:128]), jnp.asarray(w), jnp.asarray(dy[:128])  # 128 tokens: fewer kernel programs
    outs = {}
    for backend in ("xla", "pallas"):
        cfg = Fp8Config(backend=backend)
        y, vjp = jax.vjp(lambda x, w: fp8.fp8_linear(x, w, cfg), x, w)
        outs[backend] = (y,) + vjp(dy)
    for a, b in zip(outs["xla"], outs["pallas"]):
        assert max_rel(a, b) < 1e-5


def test_fp8_config_validation():
    with pytest.raises(ValueError, match="fp8.accum"):
        Fp8Config(accum="limited")  # xla backend cannot emulate it
    with pytest.raises(ValueError, match="promote_every"):
        Fp8Config(backend="pallas", accum="limited", promote_every=100)
    with pytest.raises(ValueError, match="fp8.backend"):
        Fp8Config(backend="cuda")
    with pytest.raises(ValueError, match="only the 2-D"):
        fp8.Fp8DotGeneral(Fp8Config())(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), (((2,), (0,)), ((), ())))


# ---------------------------------------------------------------------------------------------------------------
# 5. App. B.2: 128x128 blocks for dY diverge with outlier tokens, 1x128 tiles do not
# ---------------------------------------------------------------------------------------------------------------
def test_dgrad_blocks_vs_tiles_with_outlier_tokens(linear_case):
    x, w, dy = linear_case
    dy = dy.copy()
    dy[[0, 37, 130, 200]] *= 1e5  # a few outlier token rows
    exact = dy.astype(np.float64) @ w.astype(np.float64).T
    wq, sw = fp8.quantize(jnp.asarray(w), (128, 128))
    normal = np.setdiff1d(np.arange(dy.shape[0]), [0, 37, 130, 200])
    errs = {}
    for block in ((1, 128), (128, 128)):
        q, s = fp8.quantize(jnp.asarray(dy), block)
        dx = np.asarray(fp8.fp8_matmul_ref(q, s, block, wq, sw, (128, 128)))
        errs[block] = rel(dx[normal], exact[normal])
    assert errs[(1, 128)] < 0.06 and errs[(128, 128)] > 4 * errs[(1, 128)], errs


def test_model_config_fp8_field():
    from deepseek_jax.config import ModelConfig, preset
    c = preset("tiny", fp8={"pow2_scales": True})
    assert c.fp8 == Fp8Config(pow2_scales=True) and preset("tiny", fp8=True).fp8 == Fp8Config()
    assert preset("tiny", fp8=False).fp8 is None and preset("tiny").fp8 is None
    assert ModelConfig.from_dict(c.to_dict()) == c  # nested dataclass round trip
    assert "fp8" not in c.to_hf()  # execution policy, not checkpoint
    with pytest.raises(ValueError, match="ModelConfig.fp8.fmt"):
        preset("tiny", fp8={"fmt": "e3m4"})
    with pytest.raises(ValueError, match="ModelConfig.fp8:"):
        preset("tiny", fp8="yes")
    with pytest.raises(ValueError, match="no_such_field"):
        preset("tiny", fp8={"no_such_field": 1})


def test_e5m2_linear_is_coarser_than_e4m3(linear_case):
    x, w, dy = (jnp.asarray(v) for v in linear_case)
    errs = {}
    for fmt in ("e4m3", "e5m2"):
        y = fp8.fp8_linear(x, w, Fp8Config(fmt=fmt))
        errs[fmt] = rel(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    assert errs["e4m3"] < errs["e5m2"] < 0.15, errs  # one mantissa bit fewer: about twice the error
