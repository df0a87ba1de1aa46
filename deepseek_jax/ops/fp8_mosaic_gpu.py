"""The block-scaled FP8 GEMM for Hopper GPUs, in Pallas Mosaic GPU (docs/fp8.md "Kernels"; V3 §3.3.2).

    C[M, N] = sum_kb (a_q[:, kb] b_q[:, kb]^T) * a_s[:, kb, None] * b_s[None, :, kb]     (fp32)

The structure of jax's Hopper matmul example (``plgpu.kernel`` over the SMs, a software pipeline of TMA copies
into shared memory, WGMMA): every SM loops over output tiles [bm, bn]; for each tile a pipeline over the K blocks
copies the FP8 tiles a [bm, 128] and b [bn, 128] (both K-major: 8-bit WGMMA takes only K-major operands) and the
two scale vectors into shared memory; one WGMMA per 128-wide K block computes the block's product into a fresh
WGMMA accumulator, which is then multiplied by the row scales (of a) and the column scales (of b) and added into
an fp32 register accumulator carried by the pipeline: the paper's promotion every N_C = 128, with the partial
sum inside one K block left to the tensor core (whose own accumulation precision this kernel therefore exposes,
unlike the triton form, which Triton promotes after every MMA). accum="fp32" only: there is no emulation here.

Operand layouts for TMA (each copied box: at most 256 elements per dimension, global strides multiples of 16
bytes, at least 16 bytes along the minor axis): the scales are passed transposed, a_s^T [K/128, M] and
b_s^T [K/128, N] (one row per K block, a [1, bm] / [1, bn] box per step), so their only stride is M*4 or N*4
bytes (M, N are padded to the blocks, multiples of 64 and 8); a [M, K/128] scale array with K/128 = 1 has a
4-byte stride
and cannot be copied by TMA. Shared memory: see :func:`smem_bytes` (checked against Hopper's 227 KiB per block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepseek_jax import compat

TILE = 128
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one thread block may use on H100/H800/H200 (228 KiB minus 1 KiB)
WGMMA_M = 64  # WGMMA's M granularity: bm must be a multiple of 64


def smem_bytes(bm: int, bn: int, stages: int) -> int:
    """Shared memory of one thread block: ``stages`` pipeline buffers of the FP8 tiles (bm*128 + bn*128 bytes)
    and their scale rows ((bm + bn) * 4 bytes), the fp32 epilogue tile (bm*bn*4), and one 8-byte barrier per stage.
    bm = bn = 128 with 4 stages: 4*(16384 + 16384 + 1024) + 65536 + 32 = 200,736 bytes (196 KiB)."""
    return stages * (bm * TILE + bn * TILE + (bm + bn) * 4) + bm * bn * 4 + 8 * stages


def check_smem(bm: int, bn: int, stages: int) -> int:
    need = smem_bytes(bm, bn, stages)
    if need > SMEM_LIMIT:
        raise ValueError(f"fp8_gemm_mgpu: blocks bm={bm}, bn={bn} with {stages} pipeline stages need {need} bytes "
                         f"of shared memory > {SMEM_LIMIT} (Hopper's per-block limit); lower stages, bm or bn")
    return need


def fp8_gemm_mgpu(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s_rows: jax.Array, *, bm=None, bn=None,
                  stages: int = 4, interpret=None) -> jax.Array:
    """C [M, N] fp32 from a_q [M, K] fp8, a_s [M, K/128], b_q [N, K] fp8, b_s_rows [N, K/128] (one scale per row
    of b; ops/fp8_pallas.check_operands expands 128x128-block scales). Pads M, N to the blocks and K to 128."""
    plgpu = compat.mosaic_gpu()
    M, K = a_q.shape
    N = b_q.shape[0]
    bm = 128 if bm is None else bm
    bn = 128 if bn is None else bn
    bm = min(bm, max(WGMMA_M, -(-M // WGMMA_M) * WGMMA_M))  # decode: M = 8 runs in one 64-row block
    for name, v, lo in (("bm", bm, WGMMA_M), ("bn", bn, 8)):
        if v % lo or not 0 < v <= 256:
            raise ValueError(f"fp8_gemm_mgpu: {name}={v} must be a multiple of {lo} in (0, 256] (WGMMA / TMA)")
    check_smem(bm, bn, stages)
    pm, pn, pk = -M % bm, -N % bn, -K % TILE
    a_q = jnp.pad(a_q, ((0, pm), (0, pk))) if pm or pk else a_q
    b_q = jnp.pad(b_q, ((0, pn), (0, pk))) if pn or pk else b_q
    sa_t = jnp.pad(a_s.astype(jnp.float32), ((0, pm), (0, 0)), constant_values=1.0).T  # [nkb, Mp]
    sb_t = jnp.pad(b_s_rows.astype(jnp.float32), ((0, pn), (0, 0)), constant_values=1.0).T  # [nkb, Np]
    Mp, Kp = a_q.shape
    Np = b_q.shape[0]
    nkb, grid_m, grid_n = Kp // TILE, Mp // bm, Np // bn

    swizzle = plgpu.find_swizzle(TILE * 8)  # a 128-byte K row of FP8: the 128-byte swizzle
    fp8_tiles = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    f32 = jnp.float32

    def body(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _tile(info):
            (lin,) = info.index
            mi, ni = lin // grid_n, lin % grid_n

            def k_block(_, a_smem, b_smem, sa_smem, sb_smem, out):
                def mma(acc_ref):  # one 128-wide K block into a fresh accumulator
                    plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
                    return acc_ref[...]

                part = pl.run_scoped(mma, plgpu.ACC((bm, bn), f32))
                sa = compat.mosaic_gpu_load(plgpu, sa_smem.at[0], plgpu.Layout.WGMMA.reduce(1))  # [bm]
                sb = compat.mosaic_gpu_load(plgpu, sb_smem.at[0], plgpu.Layout.WGMMA.reduce(0))  # [bn]
                scale = lax.broadcast_in_dim(sa, (bm, bn), [0]) * lax.broadcast_in_dim(sb, (bm, bn), [1])
                return out + part * scale  # promotion into the fp32 register accumulator

            out0 = plgpu.layout_cast(jnp.zeros((bm, bn), f32), plgpu.Layout.WGMMA)
            out = plgpu.emit_pipeline(
                k_block, grid=(nkb,), max_concurrent_steps=stages, init_carry=out0,
                in_specs=[plgpu.BlockSpec((bm, TILE), lambda k: (mi, k), transforms=fp8_tiles),
                          plgpu.BlockSpec((bn, TILE), lambda k: (ni, k), transforms=fp8_tiles),
                          plgpu.BlockSpec((1, bm), lambda k: (k, mi)),
                          plgpu.BlockSpec((1, bn), lambda k: (k, ni))],
            )(a_gmem, b_gmem, sa_gmem, sb_gmem)

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), f32))
            def _store(o_smem):
                o_smem[...] = out
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0)

    n_sm = compat.gpu_core_count()
    out = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((Mp, Np), f32), grid=(min(n_sm, grid_m * grid_n),),
                       grid_names=("sm",),
                       **({} if interpret is None else dict(interpret=interpret)))(a_q, b_q, sa_t, sb_t)
    return out[:M, :N]
