"""The block-scaled FP8 GEMM as Pallas kernels (V3 §3.3.2 "Increasing accumulation precision"; docs/fp8.md).

    C[M, N] = sum_kb (a_q[:, kb] b_q[:, kb]^T) * a_s[:, kb, None] * b_s[None, :, kb]     (fp32)

Both operands are K-major (``a_q [M, K]``, ``b_q [N, K]``: the "NT" layout Hopper's FP8 MMA wants); scales are one
per 128 elements of K: ``a_s [M, K/128]`` (1x128 activation tiles) and ``b_s`` either ``[N, K/128]`` (1x128 tiles)
or ``[N/128, K/128]`` (128x128 weight blocks). Each 128-wide K block's partial sum is multiplied by the two
scales and added into the FP32 output: the paper's promotion interval N_C = 128.

Accumulation models (static arguments):
  accum="fp32"                exact FP32 partial sums, promotion every 128: what a correct kernel computes. One
                              128-wide dot per K block.
  accum="limited"             four 32-wide dots per K block (one FP8 MMA step each); after every step the running
                              partial is truncated toward zero to ``mantissa_bits`` significant bits (bitcast to
                              uint32, mask), emulating the ~14-bit accumulation of H800 tensor cores. With
                              ``promote_every=128`` the partial is unscaled and promoted as above. With
                              ``promote_every`` = k*128, or None (never), the partial spans several scale blocks,
                              so each step's products are scaled before they enter the limited accumulator.

Kernels (``kernel=``; docs/fp8.md "Kernels" has the table of what lowers where):
  triton      grid (M/bm, N/bn); each program loops over the K blocks, reading every K slab from the refs with
              ``pl.ds`` (Triton has no lowering for slicing a loaded value). Block dims >= 16 (``tl.dot``).
  mosaic_tpu  grid (M/bm, N/bn, K/128) with K innermost and the output block revisited (sequential grid). The
              FP8 tiles are widened to bf16 in VMEM (exact: every E4M3/E5M2 value is a bf16), so it needs no FP8
              MXU. promote_every > 128 keeps the partial in a VMEM scratch across K steps.
  mosaic_gpu  Hopper: ops/fp8_mosaic_gpu.py (plgpu.kernel + pipeline + WGMMA); accum="fp32" only. Interpreted by
              jax's Mosaic GPU interpreter where it exists (jax 0.11; compat.mosaic_gpu_interpret_params).
  interpret   the triton form run by the Pallas interpreter (CPU; slow: keep shapes small).
  auto        per lowering platform (``jax.lax.platform_dependent``; GPU compiler parameters break TPU lowering, so
              the choice cannot be one Python-level default): cuda/rocm -> triton, tpu -> mosaic_tpu, anything else
              -> interpret (unless ``interpret=False``: then lowering for CPU fails with Pallas's message).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from deepseek_jax import compat

TILE = 128  # quantization tile along K, and the promotion interval N_C
STEP = 32  # K width of one FP8 MMA step (WGMMA k = 32 for 8-bit inputs)
ACCUMS = ("fp32", "limited")
KERNELS = ("auto", "triton", "mosaic_gpu", "mosaic_tpu", "interpret")
TRITON_MIN_BLOCK = 16  # tl.dot needs every operand dimension >= 16
NT = (((1,), (1,)), ((), ()))  # a [m, k] x b [n, k] -> [m, n]


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


def _dot(a, b):
    return jax.lax.dot_general(a, b, NT, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# One 128-wide K block, read from refs (shared by the triton and mosaic_tpu forms)
# ---------------------------------------------------------------------------------------------------------------
def _kblock(load_a, load_b, k0, partial, scale, accum: str, bits: int):
    """Adds the K block [k0, k0 + 128) of a [bm, *] x b [bn, *]^T into ``partial`` [bm, bn] (fp32), where
    ``load_x(start, width)`` reads the K slab [start, start + width) of operand x from its ref (one indexer per
    load: Triton lowers neither value slicing nor chained ref views). fp32: one 128-wide dot. limited: four
    32-wide dots, truncating the running partial after each. ``scale``: None, or the [bm, bn] factor applied to
    each step's products before accumulating (long promotion)."""
    if accum == "fp32":
        prod = _dot(load_a(k0, TILE), load_b(k0, TILE))
        return partial + (prod if scale is None else prod * scale)
    for s in range(TILE // STEP):
        prod = _dot(load_a(k0 + s * STEP, STEP), load_b(k0 + s * STEP, STEP))
        partial = truncate_mantissa(partial + (prod if scale is None else prod * scale), bits)
    return partial


def _slab_loader(ref, widen=None):
    """K slabs of a 2-D [rows, K] ref, optionally widened (mosaic_tpu: bf16)."""
    def load(start, width):
        v = ref[:, pl.ds(start, width)]
        return v if widen is None else v.astype(widen)
    return load


def _kblock_from_refs(a_ref, b_ref, k0, partial, scale, accum: str, bits: int, widen=None):
    return _kblock(_slab_loader(a_ref, widen), _slab_loader(b_ref, widen), k0, partial, scale, accum, bits)


# ---------------------------------------------------------------------------------------------------------------
# Triton form: K loop inside each program
# ---------------------------------------------------------------------------------------------------------------
def k_loop(load_a, load_b, scales, nkb, shape, *, accum, bits, promote_blocks):
    """The K loop of one output tile [bm, bn] (fp32): ``nkb`` K blocks (may be traced), ``load_x(start, width)``
    reading K slabs, ``scales(kb)`` the [bm, 1] x [1, bn] scale product of block kb. ``promote_blocks``: 1
    (promote every 128), k > 1 (every k*128), 0 (never). The promotion schedule is static loops: groups of
    ``promote_blocks`` K blocks, then the remainder."""
    zero = jnp.zeros(shape, jnp.float32)

    def block(kb, partial, scale):
        return _kblock(load_a, load_b, pl.multiple_of(kb * TILE, TILE), partial, scale, accum, bits)

    if promote_blocks == 1:
        return jax.lax.fori_loop(0, nkb, lambda kb, out: out + block(kb, zero, None) * scales(kb), zero)

    def scaled_run(start, n, partial):  # n K blocks from ``start`` into one (limited) partial
        return jax.lax.fori_loop(0, n, lambda t, p: block(start + t, p, scales(start + t)), partial)

    if promote_blocks == 0:
        return scaled_run(0, nkb, zero)
    n_groups, rem = nkb // promote_blocks, nkb % promote_blocks
    out = jax.lax.fori_loop(0, n_groups, lambda g, out: out + scaled_run(g * promote_blocks, promote_blocks, zero),
                            zero)
    return out + scaled_run(n_groups * promote_blocks, rem, zero)


def _triton_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, nkb, accum, bits, promote_blocks):
    """One (i, j) program: a_ref [bm, Kp], as_ref [bm, nkb], b_ref [bn, Kp], bs_ref [nkb, bn], o_ref [bm, bn]."""
    def scales(kb):
        return as_ref[:, pl.ds(kb, 1)] * bs_ref[pl.ds(kb, 1), :]  # [bm, 1] * [1, bn]

    o_ref[...] = k_loop(_slab_loader(a_ref), _slab_loader(b_ref), scales, nkb, o_ref.shape, accum=accum, bits=bits,
                        promote_blocks=promote_blocks)


def _triton_call(a_q, a_s, b_q, b_s_rows, *, accum, bits, promote_blocks, bm, bn, interpret, num_warps,
                 num_stages):
    M, K = a_q.shape
    N = b_q.shape[0]
    nkb = K // TILE
    kernel = functools.partial(_triton_kernel, nkb=nkb, accum=accum, bits=bits, promote_blocks=promote_blocks)
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt
        kw["compiler_params"] = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32), grid=(M // bm, N // bn),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, nkb), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, K), lambda i, j: (j, 0)),
                  pl.BlockSpec((nkb, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), interpret=interpret, **kw,
        name="fp8_gemm_triton")(a_q, a_s, b_q, b_s_rows.T)


# ---------------------------------------------------------------------------------------------------------------
# Mosaic TPU form: K in the grid
# ---------------------------------------------------------------------------------------------------------------
def _tpu_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *scratch, nkb, accum, bits, promote_blocks):
    """One (i, j, kb) program: a_ref [bm, 128], b_ref [bn, 128], as_ref [bm, nkb], bs_ref [nkb, bn] (the whole
    scale rows of this tile: a TPU block's minor dims must be full or multiples of (8, 128), so the scales of
    block kb are selected in-register by a one-hot sum), o_ref [bm, bn] revisited over kb."""
    kb = pl.program_id(2)
    bm, bn = o_ref.shape
    zero = jnp.zeros((bm, bn), jnp.float32)
    sa = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, as_ref.shape, 1) == kb, as_ref[...], 0.0),
                 axis=1, keepdims=True)  # [bm, 1]
    sb = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, bs_ref.shape, 0) == kb, bs_ref[...], 0.0),
                 axis=0, keepdims=True)  # [1, bn]

    @pl.when(kb == 0)
    def _():
        o_ref[...] = zero

    if promote_blocks == 1:
        o_ref[...] += _kblock_from_refs(a_ref, b_ref, 0, zero, None, accum, bits, jnp.bfloat16) * sa * sb
        return
    (p_ref,) = scratch  # the limited partial, carried across K steps
    last = kb == nkb - 1
    start = kb == 0 if promote_blocks == 0 else kb % promote_blocks == 0

    @pl.when(start)
    def _():
        p_ref[...] = zero

    p_ref[...] = _kblock_from_refs(a_ref, b_ref, 0, p_ref[...], sa * sb, accum, bits, jnp.bfloat16)
    end = last if promote_blocks == 0 else jnp.logical_or(last, kb % promote_blocks == promote_blocks - 1)

    @pl.when(end)
    def _():
        o_ref[...] += p_ref[...]


def _tpu_call(a_q, a_s, b_q, b_s_rows, *, accum, bits, promote_blocks, bm, bn, interpret):
    M, K = a_q.shape
    N = b_q.shape[0]
    nkb = K // TILE
    kernel = functools.partial(_tpu_kernel, nkb=nkb, accum=accum, bits=bits, promote_blocks=promote_blocks)
    from jax.experimental.pallas import tpu as pltpu
    scratch = [] if promote_blocks == 1 else [pltpu.VMEM((bm, bn), jnp.float32)]
    kw = {}
    if interpret:
        kw["interpret"] = True
    else:
        kw["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    grid_spec = pl.GridSpec(
        grid=(M // bm, N // bn, nkb),
        in_specs=[pl.BlockSpec((bm, TILE), lambda i, j, k: (i, k)),
                  pl.BlockSpec((bm, nkb), lambda i, j, k: (i, 0)),
                  pl.BlockSpec((bn, TILE), lambda i, j, k: (j, k)),
                  pl.BlockSpec((nkb, bn), lambda i, j, k: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)), scratch_shapes=scratch)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32), grid_spec=grid_spec,
                          name="fp8_gemm_tpu", **kw)(a_q, a_s, b_q, b_s_rows.T)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------
def check_operands(a_q, a_s, b_q, b_s):
    """Validates shapes; returns (M, N, K, nkb, b_s as one scale per row of b [N, nkb])."""
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
    return M, N, K, nkb, b_s


def check_accum(accum, mantissa_bits, promote_every) -> int:
    """Validates the accumulation model; returns promote_blocks (1, k, or 0 = never)."""
    if accum not in ACCUMS:
        raise ValueError(f"fp8_gemm: accum must be one of {ACCUMS}, got {accum!r}")
    if accum == "fp32" and promote_every != TILE:
        raise ValueError(f"fp8_gemm: accum='fp32' promotes every {TILE}; promote_every={promote_every} needs "
                         "accum='limited'")
    if promote_every is not None and (promote_every <= 0 or promote_every % TILE):
        raise ValueError(f"fp8_gemm: promote_every must be None or a positive multiple of {TILE}, "
                         f"got {promote_every}")
    truncate_mantissa(jnp.zeros((), jnp.float32), int(mantissa_bits))  # validates the range
    return 0 if promote_every is None else promote_every // TILE


def _block(requested: Optional[int], dim: int, minimum: int, default: int) -> int:
    b = default if requested is None else requested
    if b <= 0 or b & (b - 1):
        raise ValueError(f"fp8_gemm: block sizes must be powers of two, got {b}")
    return max(minimum, min(b, _next_pow2(dim)))


def _pad_operands(a_q, a_s, b_q, b_s_rows, bm, bn):
    """Zero-pad rows to whole blocks and K to whole 128-blocks (never to a power of two): zero operands add exact
    zeros, padded scales are 1. A no-op (no copy) when the shapes already fit."""
    M, K = a_q.shape
    N = b_q.shape[0]
    pm, pn, pk = -M % bm, -N % bn, -K % TILE
    if pm or pk:
        a_q = jnp.pad(a_q, ((0, pm), (0, pk)))
    if pn or pk:
        b_q = jnp.pad(b_q, ((0, pn), (0, pk)))
    a_s = jnp.pad(a_s.astype(jnp.float32), ((0, pm), (0, 0)), constant_values=1.0)
    b_s_rows = jnp.pad(b_s_rows.astype(jnp.float32), ((0, pn), (0, 0)), constant_values=1.0)
    return a_q, a_s, b_q, b_s_rows


def fp8_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, *, accum: str = "fp32",
             mantissa_bits: int = 14, promote_every: Optional[int] = TILE, kernel: str = "auto",
             interpret: Optional[bool] = None, bm: Optional[int] = None, bn: Optional[int] = None,
             num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """C = (a_q * a_s) (b_q * b_s)^T in fp32 with block scales; see the module docstring.

    a_q [M, K] float8, a_s [M, K/128] fp32; b_q [N, K] float8, b_s [N/128, K/128] or [N, K/128] fp32.
    M, N, K need not be multiples of the blocks (zero padding of rows to the block and of K to 128).
    ``kernel``: one of KERNELS. ``interpret``: run the chosen form in the Pallas interpreter (True), compile it
    (False), or (None) interpret only where nothing compiles (CPU). bm/bn: row blocks (powers of two; default
    128, shrunk for small M/N, at least 16 for triton, 8 for mosaic_tpu).
    """
    if kernel not in KERNELS:
        raise ValueError(f"fp8_gemm: kernel must be one of {KERNELS}, got {kernel!r}")
    M, N, K, nkb, b_s_rows = check_operands(a_q, a_s, b_q, b_s)
    promote_blocks = check_accum(accum, mantissa_bits, promote_every)
    bits = int(mantissa_bits)

    def run(form: str, interp: bool):
        if form == "mosaic_gpu":
            if accum != "fp32":
                raise ValueError("fp8_gemm: the mosaic_gpu kernel implements accum='fp32' only (one WGMMA "
                                 "accumulator per 128-wide K block); use kernel='triton' for the emulation")
            from deepseek_jax.ops import fp8_mosaic_gpu  # lazy: imports the Mosaic GPU API only when asked for
            ip = compat.mosaic_gpu_interpret_params() if interp else None
            return lambda: fp8_mosaic_gpu.fp8_gemm_mgpu(a_q, a_s, b_q, b_s_rows, bm=bm, bn=bn, interpret=ip)
        minimum = 8 if form == "mosaic_tpu" else TRITON_MIN_BLOCK
        bm_, bn_ = _block(bm, M, minimum, 128), _block(bn, N, minimum, 128)
        ops = _pad_operands(a_q, a_s, b_q, b_s_rows, bm_, bn_)
        kw = dict(accum=accum, bits=bits, promote_blocks=promote_blocks, bm=bm_, bn=bn_, interpret=interp)
        if form == "mosaic_tpu":
            return lambda: _tpu_call(*ops, **kw)[:M, :N]
        return lambda: _triton_call(*ops, num_warps=num_warps, num_stages=num_stages, **kw)[:M, :N]

    if kernel == "interpret":
        return run("triton", True)()
    if kernel != "auto":
        return run(kernel, bool(interpret))()
    if interpret:
        return run("triton", True)()
    gpu = lambda: run("triton", False)()  # noqa: E731
    # Elsewhere (CPU): the interpreter, or with interpret=False the compiled form, whose lowering for CPU fails
    # with Pallas's own message ("Only interpret mode is supported on CPU backend"). One branch object for all
    # the platforms that share it: platform_dependent traces each distinct branch once.
    default = gpu if interpret is False else (lambda: run("triton", True)())
    branches = dict(cuda=gpu, rocm=gpu, tpu=lambda: run("mosaic_tpu", False)())
    return jax.lax.platform_dependent(default=default, **branches)
