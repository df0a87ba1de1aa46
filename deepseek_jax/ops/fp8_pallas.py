"""The block-scaled FP8 GEMM as a Pallas kernel (V3 §3.3.2 "Increasing accumulation precision", FP8.md).

    C[M, N] = sum_kb (a_q[:, kb] b_q[:, kb]^T) * a_s[:, kb, None] * b_s[None, :, kb]     (fp32)

Both operands are K-major (``a_q [M, K]``, ``b_q [N, K]``: the "NT" layout Hopper's FP8 MMA wants); scales are one
per 128 elements of K: ``a_s [M, K/128]`` (1x128 activation tiles) and ``b_s`` either ``[N, K/128]`` (1x128 tiles)
or ``[N/128, K/128]`` (128x128 weight blocks). Inside one 128-wide K block the kernel takes four 32-wide MMA
steps into a partial sum; at the promotion point the partial is multiplied by the two scales and added into the
FP32 output (the paper's N_C = 128 promotion interval).

Accumulation models (static arguments):
  accum="fp32"                exact FP32 partial sums, promotion every 128: what a correct kernel computes.
  accum="limited"             after every 32-wide step the running partial is truncated toward zero to
                              ``mantissa_bits`` significant bits (bitcast to uint32, mask: lowers everywhere),
                              emulating the ~14-bit accumulation of H800 tensor cores (V3 §3.3.2). With
                              ``promote_every=128`` the partial is unscaled and promoted exactly as above. With
                              ``promote_every`` = a larger multiple of 128, or None (never), the partial spans
                              several scale blocks, so each step's products are scaled before they enter the
                              limited accumulator (as a per-tensor-scaled FP8 GEMM would accumulate).

Grid. ``k_in_grid=True``: grid (M/bm, N/bn, K/128) with K innermost and the output block revisited (sequential
grid semantics: interpret mode, TPU). ``k_in_grid=False``: grid (M/bm, N/bn) and a loop over the K blocks inside
each program: what GPU backends need (their grid programs run in parallel, so they cannot accumulate across a
grid axis), and what promotion intervals other than 128 need (the limited partial lives in the loop carry).
CPU: ``interpret=True``. GPU: see BUILD.md "FP8" (not yet compiled on a GPU by this project).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TILE = 128  # quantization tile along K, and the promotion interval N_C
STEP = 32  # K width of one FP8 MMA step (WGMMA k = 32 for 8-bit inputs)
ACCUMS = ("fp32", "limited")


def truncate_mantissa(x_f32: jax.Array, bits: int) -> jax.Array:
    """Truncate fp32 toward zero to ``bits`` significant bits (implicit leading bit included)."""
    if not 1 <= bits <= 24:
        raise ValueError(f"mantissa_bits must be in [1, 24], got {bits}")
    if bits == 24:
        return x_f32
    mask = jnp.uint32((0xFFFFFFFF << (24 - bits)) & 0xFFFFFFFF)
    u = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
    return jax.lax.bitcast_convert_type(u & mask, jnp.float32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kblock(a_blk, b_blk, sa_m1, sb_1n, partial, scaled: bool, accum: str, bits: int):
    """Four 32-wide MMA steps over one 128-wide K block, accumulating into ``partial`` [bm, bn] (fp32).
    ``scaled``: multiply each step's products by the block's scales before accumulating (long promotion)."""
    nt = (((1,), (1,)), ((), ()))
    for s in range(TILE // STEP):
        sl = slice(s * STEP, (s + 1) * STEP)
        prod = jax.lax.dot_general(a_blk[:, sl], b_blk[:, sl], nt, preferred_element_type=jnp.float32)
        if scaled:
            prod = prod * sa_m1 * sb_1n
        partial = partial + prod
        if accum == "limited":
            partial = truncate_mantissa(partial, bits)
    return partial


def _kernel_k_in_grid(a_ref, as_ref, b_ref, bs_ref, o_ref, *, accum, bits):
    """One (i, j, kb) program: a_ref [bm, 128], as_ref [bm, 1], b_ref [bn, 128], bs_ref [1, bn], o_ref [bm, bn]."""
    @pl.when(pl.program_id(2) == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    zero = jnp.zeros(o_ref.shape, jnp.float32)
    partial = _kblock(a_ref[...], b_ref[...], None, None, zero, False, accum, bits)
    o_ref[...] += partial * as_ref[...] * bs_ref[...]


def _kernel_k_loop(a_ref, as_ref, b_ref, bs_ref, o_ref, *, nkb, accum, bits, promote_blocks):
    """One (i, j) program looping over the K blocks: a_ref [bm, K], as_ref [bm, nkb_p], b_ref [bn, K],
    bs_ref [nkb_p, bn]. ``promote_blocks``: 1 (promote every 128), k > 1, or 0 (never)."""
    bm, bn = o_ref.shape
    scaled = promote_blocks != 1

    def body(kb, carry):
        out, partial = carry
        k0 = pl.multiple_of(kb * TILE, TILE)
        a_blk = a_ref[:, pl.ds(k0, TILE)]
        b_blk = b_ref[:, pl.ds(k0, TILE)]
        sa = as_ref[:, pl.ds(kb, 1)]  # [bm, 1]
        sb = bs_ref[pl.ds(kb, 1), :]  # [1, bn]
        partial = _kblock(a_blk, b_blk, sa, sb, partial, scaled, accum, bits)
        if promote_blocks == 1:
            return out + partial * sa * sb, jnp.zeros_like(partial)
        if promote_blocks == 0:
            return out, partial
        promote = (kb + 1) % promote_blocks == 0
        return jnp.where(promote, out + partial, out), jnp.where(promote, 0.0, partial)

    zero = jnp.zeros((bm, bn), jnp.float32)
    out, partial = jax.lax.fori_loop(0, nkb, body, (zero, zero))
    o_ref[...] = out + partial


def fp8_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, *, accum: str = "fp32",
             mantissa_bits: int = 14, promote_every: Optional[int] = TILE, bm: int = 128, bn: int = 128,
             k_in_grid: Optional[bool] = None, interpret: Optional[bool] = None,
             compiler_params=None) -> jax.Array:
    """C = (a_q * a_s) (b_q * b_s)^T in fp32 with block scales; see the module docstring.

    a_q [M, K] float8, a_s [M, K/128] fp32; b_q [N, K] float8, b_s [N/128, K/128] or [N, K/128] fp32.
    M, N, K need not be multiples of the blocks (zero padding; zero rows/columns add nothing).
    ``interpret`` defaults to True on CPU; ``k_in_grid`` to True when interpreting with promotion every 128.
    """
    if a_q.ndim != 2 or b_q.ndim != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm: a_q [M, K] and b_q [N, K] with equal K expected, got {a_q.shape} and "
                         f"{b_q.shape}")
    M, K = a_q.shape
    N = b_q.shape[0]
    nkb = -(-K // TILE)
    if a_s.shape != (M, nkb):
        raise ValueError(f"fp8_gemm: a_s must be [M, ceil(K/128)] = {(M, nkb)}, got {a_s.shape}")
    if b_s.shape == (-(-N // TILE), nkb):  # 128x128 blocks -> one scale per row of b
        b_s = jnp.repeat(b_s, TILE, axis=0)[:N]
    elif b_s.shape != (N, nkb):
        raise ValueError(f"fp8_gemm: b_s must be [ceil(N/128), ceil(K/128)] or [N, ceil(K/128)], got {b_s.shape}")
    if accum not in ACCUMS:
        raise ValueError(f"fp8_gemm: accum must be one of {ACCUMS}, got {accum!r}")
    if accum == "fp32" and promote_every != TILE:
        raise ValueError(f"fp8_gemm: accum='fp32' promotes every {TILE}; promote_every={promote_every} needs "
                         "accum='limited'")
    if promote_every is not None and (promote_every <= 0 or promote_every % TILE):
        raise ValueError(f"fp8_gemm: promote_every must be None or a positive multiple of {TILE}, "
                         f"got {promote_every}")
    for name, v in (("bm", bm), ("bn", bn)):
        if v <= 0 or v & (v - 1):
            raise ValueError(f"fp8_gemm: {name} must be a power of two, got {v}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    promote_blocks = 0 if promote_every is None else promote_every // TILE
    if k_in_grid is None:
        k_in_grid = interpret and promote_blocks == 1
    if k_in_grid and promote_blocks != 1:
        raise ValueError("fp8_gemm: k_in_grid=True needs promote_every=128 (a longer partial sum would have to "
                         "persist across grid steps)")
    bits = int(mantissa_bits)
    truncate_mantissa(jnp.zeros((), jnp.float32), bits)  # validates the range

    # Pad to whole blocks. Zero operands contribute exact zeros; padded scales are 1.
    bm_, bn_ = min(bm, _next_pow2(M)), min(bn, _next_pow2(N))
    Mp, Np, Kp = -(-M // bm_) * bm_, -(-N // bn_) * bn_, nkb * TILE
    if not interpret and not k_in_grid:
        # Compiled for a GPU, the K-loop kernel's operand blocks are [bm, Kp]: Triton wants power-of-two block
        # shapes. The loop reads only the nkb real K blocks, so the padding costs a copy, not FLOPs.
        Kp = _next_pow2(Kp)
    f32 = jnp.float32
    a_q = jnp.pad(a_q, ((0, Mp - M), (0, Kp - K)))
    b_q = jnp.pad(b_q, ((0, Np - N), (0, Kp - K)))
    a_s = jnp.pad(a_s.astype(f32), ((0, Mp - M), (0, 0)), constant_values=1.0)
    b_s = jnp.pad(b_s.astype(f32), ((0, Np - N), (0, 0)), constant_values=1.0)
    out_shape = jax.ShapeDtypeStruct((Mp, Np), f32)
    kw = dict(interpret=interpret)
    if compiler_params is not None:
        kw["compiler_params"] = compiler_params
    if k_in_grid:
        kernel = functools.partial(_kernel_k_in_grid, accum=accum, bits=bits)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid=(Mp // bm_, Np // bn_, nkb),
            in_specs=[pl.BlockSpec((bm_, TILE), lambda i, j, k: (i, k)),
                      pl.BlockSpec((bm_, 1), lambda i, j, k: (i, k)),
                      pl.BlockSpec((bn_, TILE), lambda i, j, k: (j, k)),
                      pl.BlockSpec((1, bn_), lambda i, j, k: (k, j))],
            out_specs=pl.BlockSpec((bm_, bn_), lambda i, j, k: (i, j)), **kw)(a_q, a_s, b_q, b_s.T)
    else:
        nkb_p = _next_pow2(nkb)  # power-of-two block dims for GPU lowerings
        a_s = jnp.pad(a_s, ((0, 0), (0, nkb_p - nkb)), constant_values=1.0)
        b_s = jnp.pad(b_s, ((0, 0), (0, nkb_p - nkb)), constant_values=1.0)
        kernel = functools.partial(_kernel_k_loop, nkb=nkb, accum=accum, bits=bits, promote_blocks=promote_blocks)
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid=(Mp // bm_, Np // bn_),
            in_specs=[pl.BlockSpec((bm_, Kp), lambda i, j: (i, 0)),
                      pl.BlockSpec((bm_, nkb_p), lambda i, j: (i, 0)),
                      pl.BlockSpec((bn_, Kp), lambda i, j: (j, 0)),
                      pl.BlockSpec((nkb_p, bn_), lambda i, j: (0, j))],
            out_specs=pl.BlockSpec((bm_, bn_), lambda i, j: (i, j)), **kw)(a_q, a_s, b_q, b_s.T)
    return out[:M, :N]
