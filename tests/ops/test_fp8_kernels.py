"""The FP8 GEMM kernels of ops/fp8_pallas.py (docs/fp8.md "Kernels"): each form run by the Pallas interpreter
against float64 numpy references, and each form lowered for its accelerator with jax.export at DeepSeek-V3's
GEMM shapes, asserting the lowered module holds the kernel's custom call (a silent XLA fallback cannot pass).

References: float64 matmuls of the same fp8 values; for the limited-accumulation emulation a numpy re-statement
of the truncation schedule on integer-valued operands with power-of-two scales, where every fp32 sum is exact,
so kernel and reference must agree bit for bit. Interpreted shapes are tiny; lowering is trace-only."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import compat
from deepseek_jax.ops import fp8, fp8_mosaic_gpu, fp8_pallas
from tests.ops.lowering_util import MOSAIC_GPU, MOSAIC_TPU, TRITON, count_calls, export_text

E4M3 = ml_dtypes.float8_e4m3fn
FORMS = [dict(kernel="interpret"), dict(kernel="triton", interpret=True), dict(kernel="mosaic_tpu", interpret=True)]
FORM_IDS = ["interpret", "triton-interpreted", "mosaic_tpu-interpreted"]


def _gauss_operands(M, N, K, seed, b_block=(128, 128)):
    r = np.random.RandomState(seed)
    a_q, a_s = fp8.quantize(jnp.asarray(r.normal(size=(M, K)), jnp.float32), (1, 128))
    b_q, b_s = fp8.quantize(jnp.asarray(r.normal(size=(N, K)) * 0.1, jnp.float32), b_block)
    a = np.asarray(a_q.astype(jnp.float32), np.float64) * np.repeat(np.asarray(a_s, np.float64), 128, 1)[:, :K]
    sb = np.asarray(b_s, np.float64)
    sb = np.repeat(sb, 128, 1) if b_block == (1, 128) else np.repeat(np.repeat(sb, 128, 0), 128, 1)
    b = np.asarray(b_q.astype(jnp.float32), np.float64) * sb[:N, :K]
    return (a_q, a_s, b_q, b_s), a @ b.T


def _max_rel(out, ref):
    return np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()


# ---------------------------------------------------------------------------------------------------------------
# Interpret mode == float64 numpy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("M,N,K,b_block", [(40, 72, 200, (128, 128)),   # nothing a multiple of its block
                                           (8, 256, 384, (128, 128)),   # decode: M = 8
                                           (24, 48, 256, (1, 128))])    # b in 1x128 tiles (the Wgrad's b)
def test_fp32_accumulation_equals_float64(form, M, N, K, b_block):
    ops, ref = _gauss_operands(M, N, K, seed=M + N, b_block=b_block)
    out = fp8_pallas.fp8_gemm(*ops, **form)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    assert _max_rel(out, ref) < 1e-6


def _has_mgpu_interpreter():
    try:
        compat.mosaic_gpu_interpret_params()
        return True
    except (NotImplementedError, ImportError):
        return False


@pytest.mark.skipif(not _has_mgpu_interpreter(), reason="no Mosaic GPU interpreter on this jax (new in 0.11)")
@pytest.mark.parametrize("M,N,K,b_block", [(40, 72, 200, (128, 128)), (8, 256, 384, (1, 128))])
def test_mosaic_gpu_kernel_interpreted_equals_float64(M, N, K, b_block):
    """The Hopper kernel (TMA pipeline, WGMMA per K block, scaled promotion) run by jax's Mosaic GPU interpreter."""
    ops, ref = _gauss_operands(M, N, K, seed=3 * M, b_block=b_block)
    out = fp8_pallas.fp8_gemm(*ops, kernel="mosaic_gpu", interpret=True)
    assert out.shape == (M, N) and _max_rel(out, ref) < 1e-6


def test_mosaic_gpu_shared_memory_budget():
    # 4 stages of (a tile 128x128 B + b tile 128x128 B + 2 scale rows 128x4 B) + the fp32 epilogue tile + barriers
    assert fp8_mosaic_gpu.smem_bytes(128, 128, 4) == 4 * (16384 + 16384 + 1024) + 65536 + 32 == 200736
    assert fp8_mosaic_gpu.check_smem(128, 128, 4) <= fp8_mosaic_gpu.SMEM_LIMIT
    with pytest.raises(ValueError, match=r"bm=256, bn=256 with 4 pipeline stages need \d+ bytes"):
        fp8_mosaic_gpu.check_smem(256, 256, 4)
    ops, _ = _gauss_operands(256, 256, 256, 0)
    with pytest.raises(ValueError, match="shared memory"):
        fp8_pallas.fp8_gemm(*ops, kernel="mosaic_gpu", interpret=False, bm=256, bn=256)


def _np_truncate(x32, bits):
    u = np.asarray(x32, np.float32).view(np.uint32) & np.uint32((0xFFFFFFFF << (24 - bits)) & 0xFFFFFFFF)
    return u.view(np.float32)


def _np_limited(aq, sa, bq, sb, bits, promote_blocks):
    """The limited-accumulation schedule of docs/fp8.md, in numpy: 32-wide steps, truncation after each, promotion
    every ``promote_blocks`` K blocks (0 = never; then products are scaled before accumulating)."""
    a, b = aq.astype(np.float64), bq.astype(np.float64)
    nkb = sa.shape[1]
    out = np.zeros((a.shape[0], b.shape[0]), np.float32)
    partial = np.zeros_like(out)
    for kb in range(nkb):
        scale = (sa[:, kb:kb + 1] * sb[None, :, kb][0]).astype(np.float32)
        for s in range(4):
            k0 = kb * 128 + s * 32
            prod = (a[:, k0:k0 + 32] @ b[:, k0:k0 + 32].T).astype(np.float32)  # exact: integer sums < 2^24
            if promote_blocks != 1:
                prod = prod * scale
            partial = _np_truncate(partial + prod, bits)
        if promote_blocks == 1:
            out, partial = out + partial * scale, np.zeros_like(out)
        elif promote_blocks and (kb + 1) % promote_blocks == 0:
            out, partial = out + partial, np.zeros_like(out)
    return out + partial


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("promote_every", [128, 256, None])
def test_limited_accumulation_is_the_truncation_schedule_exactly(form, promote_every):
    """Integer fp8 values in [-16, 16] (exact in E4M3) and power-of-two scales: every partial sum is an exact
    fp32 integer times a power of two, so the kernel's result is determined bit for bit. 8 mantissa bits make the
    truncation bite; K = 5 blocks leaves a remainder after the 256-wide promotion groups."""
    r = np.random.RandomState(7)
    M, N, K, bits = 24, 40, 640, 8
    aq = r.randint(-16, 17, size=(M, K)).astype(E4M3)
    bq = r.randint(-16, 17, size=(N, K)).astype(E4M3)
    sa = (2.0 ** r.randint(-3, 4, size=(M, K // 128))).astype(np.float32)
    sb = (2.0 ** r.randint(-3, 4, size=(N, K // 128))).astype(np.float32)
    pb = 0 if promote_every is None else promote_every // 128
    want = _np_limited(aq, sa, bq, sb, bits, pb)
    got = np.asarray(fp8_pallas.fp8_gemm(jnp.asarray(aq), jnp.asarray(sa), jnp.asarray(bq), jnp.asarray(sb),
                                         accum="limited", mantissa_bits=bits, promote_every=promote_every, **form))
    np.testing.assert_array_equal(got, want)
    exact = (aq.astype(np.float64) * np.repeat(sa, 128, 1)) @ (bq.astype(np.float64) * np.repeat(sb, 128, 1)).T
    assert np.abs(got - exact).max() > 0  # the truncation changed the result: the test is not vacuous


def test_kernel_argument_errors():
    ops, _ = _gauss_operands(16, 16, 128, 0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fp8_pallas.fp8_gemm(*ops, kernel="cuda")
    with pytest.raises(ValueError, match="mosaic_gpu kernel implements accum='fp32' only"):
        fp8_pallas.fp8_gemm(*ops, kernel="mosaic_gpu", accum="limited")
    with pytest.raises(ValueError, match="must be a multiple of 64"):
        fp8_pallas.fp8_gemm(*_gauss_operands(256, 256, 128, 0)[0], kernel="mosaic_gpu", interpret=False, bm=96)
    with pytest.raises(ValueError, match="powers of two"):
        fp8_pallas.fp8_gemm(*ops, kernel="interpret", bm=48)
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        jax.jit(lambda *x: fp8_pallas.fp8_gemm(*x, interpret=False)).lower(*ops)


# ---------------------------------------------------------------------------------------------------------------
# Cross-lowering at V3 shapes
# ---------------------------------------------------------------------------------------------------------------
# (M, N, K, b in 1x128 tiles?): Fprop of a 2048-wide projection from d = 7168, its transpose, the Wgrad
# 7168x2048 over 4096 tokens (b = dY^T in 1x128 tiles), q_b_proj-like 1536 -> 24576, and a decode step (M = 8)
# with the routed experts' K = 18432 (the dense FFN's intermediate size).
V3_SHAPES = [(4096, 2048, 7168, False), (4096, 7168, 2048, False), (7168, 2048, 4096, True),
             (4096, 24576, 1536, False), (8, 7168, 18432, False)]
V3_IDS = ["fprop4096x2048x7168", "fprop4096x7168x2048", "wgrad7168x2048x4096", "fprop4096x24576x1536",
          "decode8x7168x18432"]
ACCUM_CASES = [dict(), dict(accum="limited"), dict(accum="limited", promote_every=512),
               dict(accum="limited", promote_every=None)]


def _abstract_operands(M, N, K, b_rows):
    f32, f8 = jnp.float32, jnp.float8_e4m3fn
    nkb = -(-K // 128)
    return (jax.ShapeDtypeStruct((M, K), f8), jax.ShapeDtypeStruct((M, nkb), f32),
            jax.ShapeDtypeStruct((N, K), f8), jax.ShapeDtypeStruct((N if b_rows else -(-N // 128), nkb), f32))


@pytest.mark.parametrize("M,N,K,b_rows", V3_SHAPES, ids=V3_IDS)
@pytest.mark.parametrize("platform,kernel,target", [("cuda", "triton", TRITON), ("tpu", "mosaic_tpu", MOSAIC_TPU)])
def test_lowers_at_v3_shapes(M, N, K, b_rows, platform, kernel, target):
    for case in ACCUM_CASES:
        text = export_text(lambda *x: fp8_pallas.fp8_gemm(*x, kernel=kernel, interpret=False, **case),
                           _abstract_operands(M, N, K, b_rows), platform)
        assert count_calls(text, target) == 1, (case, platform)
        assert "stablehlo.dot_general" not in text  # no XLA matmul anywhere: the kernel does the GEMM


@pytest.mark.parametrize("M,N,K,b_rows", V3_SHAPES, ids=V3_IDS)
def test_mosaic_gpu_lowers_at_v3_shapes(M, N, K, b_rows):
    text = export_text(lambda *x: fp8_pallas.fp8_gemm(*x, kernel="mosaic_gpu", interpret=False),
                       _abstract_operands(M, N, K, b_rows), "cuda")
    assert count_calls(text, MOSAIC_GPU) == 1 and count_calls(text, TRITON) == 0
    assert "stablehlo.dot_general" not in text


@pytest.mark.parametrize("platform,target,other", [("cuda", TRITON, MOSAIC_TPU), ("tpu", MOSAIC_TPU, TRITON)])
def test_auto_picks_the_kernel_per_lowering_platform(platform, target, other):
    ops = _abstract_operands(256, 256, 384, False)
    for interpret in (None, False):
        text = export_text(lambda *x: fp8_pallas.fp8_gemm(*x, interpret=interpret), ops, platform)
        assert count_calls(text, target) == 1 and count_calls(text, other) == 0
    cpu = export_text(lambda *x: fp8_pallas.fp8_gemm(*x), ops, "cpu")  # interpreter: no kernel custom call
    assert count_calls(cpu, TRITON) == count_calls(cpu, MOSAIC_TPU) == 0


def test_gpu_check_script_exits_cleanly_without_a_gpu(capsys):
    from benchmarks import fp8_gpu_check
    assert fp8_gpu_check.main([]) == 2
    assert "no GPU visible to JAX" in capsys.readouterr().err
