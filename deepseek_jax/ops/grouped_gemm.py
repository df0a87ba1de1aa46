"""Grouped GEMM for the routed experts (V3 §2.1.2): one matmul per expert over that expert's rows, as one kernel,
so no expert's GEMM is ever computed densely over all rows (``jax.lax.ragged_dot`` may be rewritten into a dense
dot on XLA:GPU, E times the compute and memory).

Layout (``ops/moe_dispatch.py``'s ``_tile_layout``): the routed rows are sorted by expert and each expert's segment
is padded with zero rows to a whole number of row tiles of ``tile`` rows, so every tile belongs to one expert:

    x_pk        [P, k]      P = n_tiles * tile rows; tile t is rows [t*tile, (t+1)*tile)
    tile_e      [n_tiles]   the expert of tile t (int32)
    tile_start  [E + 1]     expert e owns tiles [tile_start[e], tile_start[e+1]); tile_start[E] = tiles in use

Three GEMMs, the forward and both backward ones (``gmm``'s custom VJP):

    gmm    y[t]   = x[t] W_{tile_e[t]}          [P, k] x [E, k, n] -> [P, n]     forward
    gmm_t  dx[t]  = dy[t] W_{tile_e[t]}^T       [P, n] x [E, k, n] -> [P, k]     data gradient
    tgmm   dW_e   = sum_{t of e} x[t]^T dy[t]   [P, k] x [P, n]    -> [E, k, n]  weight gradient (fp32)

Tiles past tile_start[E] (the static bound's unused tail) are not computed: gmm writes zeros there.

Backends (``backend``):
  triton    a Pallas kernel lowered through Triton (GPU). gmm: grid (tile, column block), a loop over k blocks
            reading the tile's expert's weights in place; tgmm: grid (expert, k block, column block), a loop over
            that expert's tiles (no atomics). On CPU it runs in Pallas interpret mode (tests only: slow).
  megablox  ``jax.experimental.pallas.ops.tpu.megablox`` gmm / tgmm (the Pallas TPU grouped matmul MaxText uses),
            fed the padded group sizes (tile_start differences times tile); its own custom VJP.
``grouped_matmul(..., backend="auto")`` lowers the Triton kernel for cuda, megablox for tpu and the Triton kernel in
interpret mode elsewhere, chosen per lowering platform (``jax.lax.platform_dependent``), so a CPU host can lower the
GPU and TPU programs (tests/test_cross_lowering.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from deepseek_jax import compat

BACKENDS = ("auto", "triton", "megablox")
BLOCK = 128  # column and k block of the Triton kernels (pow2; smaller for small operands)


def _pow2_block(n: int, cap: int = BLOCK) -> int:
    """The largest block <= cap for an axis of n: cap, or the next power of two >= n when n < cap (min 16, the
    smallest tensor-core tile Triton's dot accepts)."""
    return min(cap, max(16, 1 << max(0, (n - 1).bit_length())))


def _pad_to(a, axis: int, multiple: int):
    n = a.shape[axis]
    pad = -(-n // multiple) * multiple - n
    if not pad:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


# ---------------------------------------------------------------------------------------------------------------
# Triton (GPU) kernels
# ---------------------------------------------------------------------------------------------------------------
def _gmm_kernel(tile_e_ref, n_used_ref, x_ref, w_ref, o_ref, *, tile, bk, bn, nkb, transpose_rhs):
    """Program (t, j): o[t*tile:(t+1)*tile, j*bn:(j+1)*bn] = x[tile t] W_e[:, block j] (or W_e^T), e = tile_e[t]."""
    t, j = pl.program_id(0), pl.program_id(1)

    @pl.when(t < n_used_ref[0])
    def _():
        e = tile_e_ref[t]
        r0 = pl.multiple_of(t * tile, tile)
        c0 = pl.multiple_of(j * bn, bn)

        def body(kb, acc):
            k0 = pl.multiple_of(kb * bk, bk)
            x = x_ref[pl.ds(r0, tile), pl.ds(k0, bk)]
            if transpose_rhs:  # W_e [n_out, k] rows c0.., columns k0..: x W^T
                w = w_ref[e, pl.ds(c0, bn), pl.ds(k0, bk)]
                return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
            w = w_ref[e, pl.ds(k0, bk), pl.ds(c0, bn)]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, nkb, body, jnp.zeros((tile, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(t >= n_used_ref[0])
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _tgmm_kernel(tile_start_ref, x_ref, dy_ref, o_ref, *, tile, bk, bn):
    """Program (e, i, j): dW_e[i*bk:, j*bn:] = sum over expert e's tiles t of
    x[tile t, block i]^T dy[tile t, block j]."""
    e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0 = pl.multiple_of(i * bk, bk)
    c0 = pl.multiple_of(j * bn, bn)

    def body(t, acc):
        r0 = pl.multiple_of(t * tile, tile)
        x = x_ref[pl.ds(r0, tile), pl.ds(k0, bk)]
        g = dy_ref[pl.ds(r0, tile), pl.ds(c0, bn)]
        return acc + jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(tile_start_ref[e], tile_start_ref[e + 1], body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc


def _triton_gmm(x_pk, w, tile_e, n_used, *, tile, transpose_rhs, interpret, out_dtype):
    """[P, k] x W -> [P, n] with W = w [E, k, n] (or w [E, n, k] with transpose_rhs), per row tile."""
    P, k = x_pk.shape
    n = w.shape[1] if transpose_rhs else w.shape[2]
    bk, bn = _pow2_block(k), _pow2_block(n)
    x_p = _pad_to(x_pk, 1, bk)
    if transpose_rhs:
        w_p = _pad_to(_pad_to(w, 1, bn), 2, bk)
    else:
        w_p = _pad_to(_pad_to(w, 1, bk), 2, bn)
    kp, n_p = x_p.shape[1], -(-n // bn) * bn
    kernel = functools.partial(_gmm_kernel, tile=tile, bk=bk, bn=bn, nkb=kp // bk, transpose_rhs=transpose_rhs)
    full = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * a.ndim)
    n_used_1 = jnp.reshape(n_used, (1,)).astype(jnp.int32)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((P, n_p), out_dtype), grid=(P // tile, n_p // bn),
        in_specs=[full(tile_e), full(n_used_1), full(x_p), full(w_p)],
        out_specs=pl.BlockSpec((tile, bn), lambda t, j: (t, j)), interpret=interpret,
        **({} if interpret else compat.triton_compiler_params()))(tile_e, n_used_1, x_p, w_p)
    return out[:, :n]


def _triton_tgmm(x_pk, dy_pn, tile_start, num_experts, *, tile, interpret):
    """dW [E, k, n] (fp32) = per expert, sum over its tiles of x^T dy."""
    k, n = x_pk.shape[1], dy_pn.shape[1]
    bk, bn = _pow2_block(k), _pow2_block(n)
    x_p, dy_p = _pad_to(x_pk, 1, bk), _pad_to(dy_pn, 1, bn)
    kp, n_p = x_p.shape[1], dy_p.shape[1]
    kernel = functools.partial(_tgmm_kernel, tile=tile, bk=bk, bn=bn)
    full = lambda a: pl.BlockSpec(a.shape, lambda e, i, j: (0,) * a.ndim)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_experts, kp, n_p), jnp.float32),
        grid=(num_experts, kp // bk, n_p // bn),
        in_specs=[full(tile_start), full(x_p), full(dy_p)],
        out_specs=pl.BlockSpec((None, bk, bn), lambda e, i, j: (e, i, j)), interpret=interpret,
        **({} if interpret else compat.triton_compiler_params()))(tile_start, x_p, dy_p)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm_triton(x_pk, w_ekn, tile_e, tile_start, tile, interpret):
    return _triton_gmm(x_pk, w_ekn, tile_e, tile_start[-1], tile=tile, transpose_rhs=False, interpret=interpret,
                       out_dtype=jnp.result_type(x_pk.dtype, w_ekn.dtype))


def _gmm_triton_fwd(x_pk, w_ekn, tile_e, tile_start, tile, interpret):
    return _gmm_triton(x_pk, w_ekn, tile_e, tile_start, tile, interpret), (x_pk, w_ekn, tile_e, tile_start)


def _gmm_triton_bwd(tile, interpret, res, ct_pn):
    x_pk, w_ekn, tile_e, tile_start = res
    ct = ct_pn.astype(x_pk.dtype)
    dx = _triton_gmm(ct, w_ekn, tile_e, tile_start[-1], tile=tile, transpose_rhs=True, interpret=interpret,
                     out_dtype=x_pk.dtype)
    dw = _triton_tgmm(x_pk, ct, tile_start, w_ekn.shape[0], tile=tile, interpret=interpret)
    return dx, dw.astype(w_ekn.dtype), None, None


_gmm_triton.defvjp(_gmm_triton_fwd, _gmm_triton_bwd)


# ---------------------------------------------------------------------------------------------------------------
# megablox (TPU)
# ---------------------------------------------------------------------------------------------------------------
def _gmm_megablox(x_pk, w_ekn, tile_start, tile, interpret):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # lazy: TPU-only Pallas ops

    P, k = x_pk.shape
    n = w_ekn.shape[2]
    sizes_e = ((tile_start[1:] - tile_start[:-1]) * tile).astype(jnp.int32)
    # megablox tiles k and n by (tk, tn) = (128, 128) (the TPU lowering wants the last two block dims divisible by
    # 8 and 128; its backward swaps the roles of k and n): operands are zero-padded to whole blocks.
    tk = tn = BLOCK
    x_p = _pad_to(x_pk, 1, tk)
    w_p = _pad_to(_pad_to(w_ekn, 1, tk), 2, tn)
    y = megablox.gmm(x_p, w_p, sizes_e, jnp.result_type(x_pk.dtype, w_ekn.dtype), (tile, tk, tn), None, None,
                     False, interpret)
    rows = jnp.arange(P, dtype=jnp.int32)[:, None] < tile_start[-1] * tile
    return jnp.where(rows, y[:, :n], 0)  # rows past the tiles in use are not written by megablox


# ---------------------------------------------------------------------------------------------------------------
def grouped_matmul(x_pk, w_ekn, tile_e, tile_start, *, tile: int, backend: str = "auto",
                   interpret: bool | None = None):
    """y[t] = x[t] W_{tile_e[t]} for every row tile t in use (zeros past them): [P, k] x [E, k, n] -> [P, n] in
    the inputs' dtype (fp32 accumulation). Differentiable (custom VJP: ``gmm_t`` and ``tgmm``; module docstring).

    backend: "triton" | "megablox" | "auto" (per lowering platform: cuda -> triton, tpu -> megablox, else triton
    in interpret mode). ``interpret``: Pallas interpret mode; None = only where the lowering platform has no
    compiled kernel (CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: backend must be one of {BACKENDS}, got {backend!r}")
    P, E = x_pk.shape[0], w_ekn.shape[0]
    if x_pk.ndim != 2 or w_ekn.ndim != 3 or w_ekn.shape[1] != x_pk.shape[1]:
        raise ValueError(f"grouped_matmul: x [P, k] and w [E, k, n] expected, got {x_pk.shape} and {w_ekn.shape}")
    if P % tile or tile_e.shape != (P // tile,) or tile_start.shape != (E + 1,):
        raise ValueError(f"grouped_matmul: P={P} rows in tiles of {tile} need tile_e [{P // tile}] and tile_start "
                         f"[{E + 1}], got {tile_e.shape} and {tile_start.shape}")
    tile_e, tile_start = tile_e.astype(jnp.int32), tile_start.astype(jnp.int32)
    triton = lambda interp: _gmm_triton(x_pk, w_ekn, tile_e, tile_start, tile, interp)
    megablox = lambda interp: _gmm_megablox(x_pk, w_ekn, tile_start, tile, interp)
    if backend == "triton":
        return triton(bool(interpret) if interpret is not None else jax.default_backend() == "cpu")
    if backend == "megablox":
        return megablox(bool(interpret) if interpret is not None else jax.default_backend() != "tpu")
    if interpret is not None:
        raise ValueError("grouped_matmul: backend='auto' picks interpret mode per platform; pass interpret only "
                         "with backend='triton' or 'megablox'")
    return jax.lax.platform_dependent(cuda=lambda: triton(False), tpu=lambda: megablox(False),
                                      default=lambda: triton(True))
