"""Grouped block-scaled FP8 GEMMs for the routed experts (V3 §3.3; docs/fp8.md "Grouped GEMMs").

Layout: DeepGEMM's "contiguous" grouping. The routed rows are sorted by expert and each expert's segment is
zero-padded to a multiple of 128 rows (``moe_dispatch._tile_layout`` with a 128-row tile), so every 128-row tile
belongs to one expert, ``tile_e [P/128]``, and the 1x128 quantization tiles along the rows of the Wgrad never
straddle two experts. Three kernels, each in a triton form (also run by the interpreter) and a mosaic_tpu form:

  grouped_gemm   C[P, N]    = A[P, K] B[tile_e[t]][N, K]^T for the rows of tile t     (Fprop, Dgrad)
  grouped_wgrad  C[E, M, N] = sum over expert e's row blocks of A[M, rows] B[N, rows]^T   (Wgrad: K-grouped)

Scales as in ops/fp8_pallas.py: 1x128 tiles along K for A (``a_s [P, K/128]``), 128x128 blocks or 1x128 tiles
for B. The expert of each tile reaches the kernel as data: the triton form reads it from a small int32 ref and
indexes the stacked weights with it (Triton has no scalar prefetch); the TPU form uses scalar prefetch in the
BlockSpec index maps. accum="fp32", or "limited" with promotion every 128 (the per-K-block schedule).

``fp8_grouped_linear(x_pk, w_ekn, tile_e, cfg)``: Y = X W_{tile_e} with a custom VJP whose three GEMMs are these
kernels with the tilings of ops/fp8.fp8_linear (Fprop X 1x128 x W 128x128 blocks; Dgrad dY 1x128 x the same W
blocks; Wgrad X^T and dY^T in 1x128 tiles along the rows, X requantized from its FP8 copy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from deepseek_jax.config import Fp8Config
from deepseek_jax.ops import fp8, fp8_pallas
from deepseek_jax.ops.fp8_pallas import TILE

GROUP_TILE = TILE  # row alignment of every expert's segment (and the row tile of the grouped kernels)


def _check(accum, mantissa_bits, promote_every):
    pb = fp8_pallas.check_accum(accum, mantissa_bits, promote_every)
    if pb != 1:
        raise ValueError(f"grouped FP8 GEMM: promote_every must be 128 (got {promote_every}); the longer "
                         "promotion intervals are emulated by the dense kernel only")
    return int(mantissa_bits)


def _rows_scales(b_s, n_rows):
    """[E, N/128, nkb] (128x128 blocks) or [E, N, nkb] (1x128 tiles) -> one scale per row, [E, N, nkb]."""
    if b_s.shape[1] != n_rows:
        b_s = jnp.repeat(b_s, TILE, axis=1)[:, :n_rows]
    return b_s.astype(jnp.float32)


def _pad_k(x, axis):
    pad = -x.shape[axis] % TILE
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _pad_rows(x, axis, mult, value=0):
    pad = -x.shape[axis] % mult
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mode(kernel, interpret):
    """(form, interpret) for a grouped call: the same choices as fp8_pallas.fp8_gemm; auto is resolved by the
    caller through platform_dependent."""
    if kernel == "mosaic_gpu":
        raise ValueError("grouped FP8 GEMM: no mosaic_gpu form yet; use kernel='triton' (or 'auto') on GPUs")
    if kernel == "interpret":
        return "triton", True
    return kernel, bool(interpret)


def _per_platform(run, kernel, interpret):
    if kernel == "interpret" or (kernel == "auto" and interpret):
        return run("triton", True)
    if kernel != "auto":
        return run(*_mode(kernel, interpret))
    gpu = functools.partial(run, "triton", False)
    default = gpu if interpret is False else functools.partial(run, "triton", True)
    return jax.lax.platform_dependent(default=default, cuda=gpu, rocm=gpu, tpu=functools.partial(run, "mosaic_tpu",
                                                                                                 False))


# ---------------------------------------------------------------------------------------------------------------
# Grouped GEMM (Fprop, Dgrad): one expert per 128-row tile
# ---------------------------------------------------------------------------------------------------------------
def _grouped_triton_kernel(te_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, nkb, accum, bits):
    """Program (t, j): a_ref [128, Kp] (tile t's rows), as_ref [128, nkb], b_ref [E, N, Kp] and bs_ref
    [E, nkb, N] whole (indexed by the tile's expert), o_ref [128, bn]."""
    e = te_ref[pl.program_id(0)]
    bm, bn = o_ref.shape
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)

    def load_b(start, width):
        return b_ref[e, pl.ds(n0, bn), pl.ds(start, width)]

    def scales(kb):
        return as_ref[:, pl.ds(kb, 1)] * bs_ref[e, pl.ds(kb, 1), pl.ds(n0, bn)]

    o_ref[...] = fp8_pallas.k_loop(fp8_pallas._slab_loader(a_ref), load_b, scales, nkb, (bm, bn), accum=accum,
                                   bits=bits, promote_blocks=1)


def _grouped_tpu_kernel(te_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, accum, bits):
    """Program (t, j, kb): a_ref [128, 128], as_ref [128, nkb], b_ref [bn, 128] of expert te[t], bs_ref [nkb, bn]."""
    del te_ref  # used by the index maps only
    kb = pl.program_id(2)
    sa = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, as_ref.shape, 1) == kb, as_ref[...], 0.0),
                 axis=1, keepdims=True)
    sb = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, bs_ref.shape, 0) == kb, bs_ref[...], 0.0),
                 axis=0, keepdims=True)

    @pl.when(kb == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    zero = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] += fp8_pallas._kblock_from_refs(a_ref, b_ref, 0, zero, None, accum, bits, jnp.bfloat16) * sa * sb


def grouped_gemm(tile_e, a_q, a_s, b_q, b_s, *, accum="fp32", mantissa_bits=14, promote_every=TILE,
                 kernel="auto", interpret=None, bn=128):
    """C[P, N] (fp32): rows [128 t, 128 t + 128) of ``a_q [P, K]`` times expert ``tile_e[t]`` of
    ``b_q [E, N, K]``^T. ``a_s [P, K/128]``; ``b_s [E, N/128, K/128]`` or ``[E, N, K/128]``. P must be a
    multiple of 128 (the contiguous layout); N and K are padded."""
    P, K = a_q.shape
    E, N, K2 = b_q.shape
    nkb = -(-K // TILE)
    if K2 != K or P % GROUP_TILE or tile_e.shape != (P // GROUP_TILE,) or a_s.shape != (P, nkb):
        raise ValueError(f"grouped_gemm: need a_q [P, K] with P a multiple of {GROUP_TILE}, b_q [E, N, K], tile_e "
                         f"[P/{GROUP_TILE}], a_s [P, ceil(K/128)]; got a_q {a_q.shape}, b_q {b_q.shape}, tile_e "
                         f"{tile_e.shape}, a_s {a_s.shape}")
    bits = _check(accum, mantissa_bits, promote_every)
    b_rows = _rows_scales(b_s, N)
    if b_rows.shape != (E, N, nkb):
        raise ValueError(f"grouped_gemm: b_s must be [E, ceil(N/128), ceil(K/128)] or [E, N, ceil(K/128)], "
                         f"got {b_s.shape}")
    bn = max(fp8_pallas.TRITON_MIN_BLOCK, min(bn, fp8_pallas._next_pow2(N)))
    a_q, b_q = _pad_k(a_q, 1), _pad_rows(_pad_k(b_q, 2), 1, bn)
    bs_t = jnp.swapaxes(_pad_rows(b_rows, 1, bn, 1.0), 1, 2)  # [E, nkb, Np]
    a_s = a_s.astype(jnp.float32)
    Np, Kp = b_q.shape[1], b_q.shape[2]
    tile_e = tile_e.astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct((P, Np), jnp.float32)

    def run(form, interp):
        if form == "mosaic_tpu":
            from jax.experimental.pallas import tpu as pltpu
            spec = pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(P // GROUP_TILE, Np // bn, nkb),
                in_specs=[pl.BlockSpec((GROUP_TILE, TILE), lambda t, j, k, te: (t, k)),
                          pl.BlockSpec((GROUP_TILE, nkb), lambda t, j, k, te: (t, 0)),
                          pl.BlockSpec((None, bn, TILE), lambda t, j, k, te: (te[t], j, k)),
                          pl.BlockSpec((None, nkb, bn), lambda t, j, k, te: (te[t], 0, j))],
                out_specs=pl.BlockSpec((GROUP_TILE, bn), lambda t, j, k, te: (t, j)))
            kw = dict(interpret=True) if interp else dict(compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")))
            return pl.pallas_call(functools.partial(_grouped_tpu_kernel, accum=accum, bits=bits),
                                  out_shape=out_shape, grid_spec=spec, name="fp8_grouped_tpu", **kw)(
                tile_e, a_q, a_s, b_q, bs_t)
        kw = {}
        if not interp:
            from jax.experimental.pallas import triton as plt
            kw["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=3)
        return pl.pallas_call(
            functools.partial(_grouped_triton_kernel, nkb=nkb, accum=accum, bits=bits), out_shape=out_shape,
            grid=(P // GROUP_TILE, Np // bn),
            in_specs=[pl.BlockSpec(tile_e.shape, lambda t, j: (0,)),
                      pl.BlockSpec((GROUP_TILE, Kp), lambda t, j: (t, 0)),
                      pl.BlockSpec((GROUP_TILE, nkb), lambda t, j: (t, 0)),
                      pl.BlockSpec(b_q.shape, lambda t, j: (0, 0, 0)),
                      pl.BlockSpec(bs_t.shape, lambda t, j: (0, 0, 0))],
            out_specs=pl.BlockSpec((GROUP_TILE, bn), lambda t, j: (t, j)), interpret=interp,
            name="fp8_grouped_triton", **kw)(tile_e, a_q, a_s, b_q, bs_t)

    return _per_platform(run, kernel, interpret)[:, :N]


# ---------------------------------------------------------------------------------------------------------------
# K-grouped GEMM (Wgrad): the contraction runs over one expert's row blocks
# ---------------------------------------------------------------------------------------------------------------
def _segments(tile_e, E):
    """First row block and number of row blocks of each expert (tiles are sorted by expert)."""
    n = jnp.bincount(tile_e, length=E).astype(jnp.int32)
    return jnp.cumsum(n, dtype=jnp.int32) - n, n


def _wgrad_triton_kernel(start_ref, n_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, accum, bits):
    """Program (e, i, j): a_ref [bm, P], as_ref [bm, P/128], b_ref [bn, P], bs_ref [P/128, bn], o_ref [bm, bn];
    loops over expert e's row blocks (a dynamic count)."""
    e = pl.program_id(0)
    start, n = start_ref[e], n_ref[e]

    def load(ref):
        return lambda s, w: ref[:, pl.ds(s + start * TILE, w)]

    def scales(kb):
        return as_ref[:, pl.ds(start + kb, 1)] * bs_ref[pl.ds(start + kb, 1), :]

    o_ref[...] = fp8_pallas.k_loop(load(a_ref), load(b_ref), scales, n, o_ref.shape, accum=accum, bits=bits,
                                   promote_blocks=1)


def _wgrad_tpu_kernel(start_ref, n_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, accum, bits):
    """Program (e, i, j, k): row block start[e] + min(k, n[e] - 1) (the index maps clamp), skipped for k >= n[e]."""
    e, k = pl.program_id(0), pl.program_id(3)
    kb = start_ref[e] + jnp.minimum(k, jnp.maximum(n_ref[e] - 1, 0))

    @pl.when(k == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    @pl.when(k < n_ref[e])
    def _():
        sa = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, as_ref.shape, 1) == kb, as_ref[...], 0.0),
                     axis=1, keepdims=True)
        sb = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, bs_ref.shape, 0) == kb, bs_ref[...], 0.0),
                     axis=0, keepdims=True)
        zero = jnp.zeros(o_ref.shape, jnp.float32)
        o_ref[...] += fp8_pallas._kblock_from_refs(a_ref, b_ref, 0, zero, None, accum, bits, jnp.bfloat16) * sa * sb


def grouped_wgrad(tile_e, n_experts, a_q, a_s, b_q, b_s, *, accum="fp32", mantissa_bits=14,
                  promote_every=TILE, kernel="auto", interpret=None, bm=128, bn=128):
    """C[E, M, N] (fp32) = for each expert e, a_q[:, rows_e] b_q[:, rows_e]^T with rows_e its 128-row tiles
    (``tile_e [P/128]``, sorted). a_q [M, P], a_s [M, P/128], b_q [N, P], b_s [N, P/128] (1x128 tiles along the
    rows). An expert with no rows gets zeros."""
    M, P = a_q.shape
    N = b_q.shape[0]
    nb = P // GROUP_TILE
    if P % GROUP_TILE or b_q.shape[1] != P or a_s.shape != (M, nb) or b_s.shape != (N, nb) \
            or tile_e.shape != (nb,):
        raise ValueError(f"grouped_wgrad: need a_q [M, P], b_q [N, P] with P a multiple of {GROUP_TILE}, scales "
                         f"[., P/128], tile_e [P/128]; got a_q {a_q.shape}, a_s {a_s.shape}, b_q {b_q.shape}, "
                         f"b_s {b_s.shape}, tile_e {tile_e.shape}")
    bits = _check(accum, mantissa_bits, promote_every)
    start, n = _segments(tile_e.astype(jnp.int32), n_experts)
    bm = max(fp8_pallas.TRITON_MIN_BLOCK, min(bm, fp8_pallas._next_pow2(M)))
    bn = max(fp8_pallas.TRITON_MIN_BLOCK, min(bn, fp8_pallas._next_pow2(N)))
    a_q, b_q = _pad_rows(a_q, 0, bm), _pad_rows(b_q, 0, bn)
    a_s = _pad_rows(a_s.astype(jnp.float32), 0, bm, 1.0)
    bs_t = _pad_rows(b_s.astype(jnp.float32), 0, bn, 1.0).T  # [P/128, Np]
    Mp, Np = a_q.shape[0], b_q.shape[0]
    out_shape = jax.ShapeDtypeStruct((n_experts, Mp, Np), jnp.float32)

    def run(form, interp):
        if form == "mosaic_tpu":
            from jax.experimental.pallas import tpu as pltpu

            def kblk(e, k, st, nn):
                return st[e] + jnp.minimum(k, jnp.maximum(nn[e] - 1, 0))
            spec = pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2, grid=(n_experts, Mp // bm, Np // bn, nb),
                in_specs=[pl.BlockSpec((bm, TILE), lambda e, i, j, k, st, nn: (i, kblk(e, k, st, nn))),
                          pl.BlockSpec((bm, nb), lambda e, i, j, k, st, nn: (i, 0)),
                          pl.BlockSpec((bn, TILE), lambda e, i, j, k, st, nn: (j, kblk(e, k, st, nn))),
                          pl.BlockSpec((nb, bn), lambda e, i, j, k, st, nn: (0, j))],
                out_specs=pl.BlockSpec((None, bm, bn), lambda e, i, j, k, st, nn: (e, i, j)))
            kw = dict(interpret=True) if interp else dict(compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))
            return pl.pallas_call(functools.partial(_wgrad_tpu_kernel, accum=accum, bits=bits), out_shape=out_shape,
                                  grid_spec=spec, name="fp8_grouped_wgrad_tpu", **kw)(start, n, a_q, a_s, b_q, bs_t)
        kw = {}
        if not interp:
            from jax.experimental.pallas import triton as plt
            kw["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=3)
        return pl.pallas_call(
            functools.partial(_wgrad_triton_kernel, accum=accum, bits=bits), out_shape=out_shape,
            grid=(n_experts, Mp // bm, Np // bn),
            in_specs=[pl.BlockSpec((n_experts,), lambda e, i, j: (0,)),
                      pl.BlockSpec((n_experts,), lambda e, i, j: (0,)),
                      pl.BlockSpec((bm, P), lambda e, i, j: (i, 0)),
                      pl.BlockSpec((bm, nb), lambda e, i, j: (i, 0)),
                      pl.BlockSpec((bn, P), lambda e, i, j: (j, 0)),
                      pl.BlockSpec((nb, bn), lambda e, i, j: (0, j))],
            out_specs=pl.BlockSpec((None, bm, bn), lambda e, i, j: (e, i, j)), interpret=interp,
            name="fp8_grouped_wgrad_triton", **kw)(start, n, a_q, a_s, b_q, bs_t)

    return _per_platform(run, kernel, interpret)[:, :M, :N]


# ---------------------------------------------------------------------------------------------------------------
# The grouped FP8 linear (custom VJP)
# ---------------------------------------------------------------------------------------------------------------
def _kw(cfg: Fp8Config):
    return dict(accum=cfg.accum, mantissa_bits=cfg.mantissa_bits, promote_every=cfg.promote_every,
                kernel=cfg.kernel, interpret=cfg.interpret)


def _quant_fwd(x_pk, w_ekn, cfg):
    xq, sx = fp8.quantize(x_pk, fp8.TILE_1x128, cfg.fmt, cfg.pow2_scales)
    wq, sw = jax.vmap(lambda w: fp8.quantize(w, fp8.BLOCK_128x128, cfg.fmt, cfg.pow2_scales))(w_ekn)
    return xq, sx, wq, sw  # [P, K], [P, K/128], [E, K, N], [E, K/128, N/128]


def _fprop(xq, sx, wq, sw, tile_e, cfg):
    return grouped_gemm(tile_e, xq, sx, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(sw, 1, 2), **_kw(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_linear(x_pk, w_ekn, tile_e, cfg: Fp8Config):
    """y[P, N] = x[P, K] w[tile_e[row // 128]] with all three GEMMs grouped FP8 kernels (module docstring).
    ``tile_e`` [P/128] int32, sorted (the contiguous layout). Output in x's dtype."""
    xq, sx, wq, sw = _quant_fwd(x_pk, w_ekn, cfg)
    return _fprop(xq, sx, wq, sw, tile_e, cfg).astype(x_pk.dtype)


def _fwd(x_pk, w_ekn, tile_e, cfg):
    xq, sx, wq, sw = _quant_fwd(x_pk, w_ekn, cfg)
    y = _fprop(xq, sx, wq, sw, tile_e, cfg).astype(x_pk.dtype)
    return y, (xq, sx, wq, sw, tile_e, jnp.zeros((0,), x_pk.dtype), jnp.zeros((0,), w_ekn.dtype))


def _bwd(cfg, res, dy_pn):
    xq, sx, wq, sw, tile_e, x_dt, w_dt = res
    fmt, p2 = cfg.fmt, cfg.pow2_scales
    dyq, sdy = fp8.quantize(dy_pn, fp8.TILE_1x128, fmt, p2)
    dx = grouped_gemm(tile_e, dyq, sdy, wq, sw, **_kw(cfg))  # dX = dY W_e^T: b = W_e [K, N], K-major in N
    x_deq = fp8.dequantize(xq, sx, fp8.TILE_1x128)
    xtq, sxt = fp8.quantize(x_deq.T, fp8.TILE_1x128, fmt, p2)  # [K, P]: 128x1 tiles of X, per expert segment
    dytq, sdyt = fp8.quantize(dy_pn.T, fp8.TILE_1x128, fmt, p2)  # [N, P]
    dw = grouped_wgrad(tile_e, wq.shape[0], xtq, sxt, dytq, sdyt, **_kw(cfg))
    tile_ct = jnp.zeros(tile_e.shape, jax.dtypes.float0)
    return dx.astype(x_dt.dtype), dw.astype(w_dt.dtype), tile_ct


fp8_grouped_linear.defvjp(_fwd, _bwd)


def grouped_linear_fn(cfg: Fp8Config):
    """``linear_fn(x_pk, w_ekn, tile_e)`` for ``moe_dispatch.dispatch_fp8_grouped``."""
    return functools.partial(_grouped_linear_apply, cfg=cfg)


def _grouped_linear_apply(x_pk, w_ekn, tile_e, cfg):
    return fp8_grouped_linear(x_pk, w_ekn, tile_e, cfg)
