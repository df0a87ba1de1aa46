"""Routed-expert dispatch kernels for DeepSeekMoE (V3 §2.1.2): sum_k g_k * FFN_{e_k}(x) for every token, each a
plain function of (x [N, d], expert ids [N, K], gate weights [N, K], W_gate/W_up [E, d, F], W_down [E, F, d]).

Dispatch (all dropless, all the same function; tests hold each equal to ``dense``):
  dense         every expert on every token, masked combine: obviously correct, O(E) compute. Reference only.
  ragged        sort routed rows by expert, jax.lax.ragged_dot (grouped GEMM on GPU/TPU).
  sorted_tiles  sort routed rows by expert, pad each expert's segment to a multiple of `moe_tile_size`, and
                loop over the used tiles, each one [tile, d] x [d, F] matmul with its expert's weights sliced in
                place (custom VJP: the backward is the same loop). On CPU, ragged_dot lowers to a masked dense
                computation; this path does only the routed FLOPs plus < 1 tile of padding per expert
                (speed against an equal-FLOP matmul: benchmarks/results/moe_dispatch_cpu.md). Reverse-mode only.
  bucket_tiles  each expert's first C = floor(N*K/E) routed rows (its mean load) in a bucket [E, C, d], the expert
                GEMMs batched over the buckets (weights read in place, plain autodiff); the rows past an expert's
                first C through a tile loop like sorted_tiles' that gathers and scatters its rows per tile (no
                buffer of the padded size), so balanced loads run no tile at all. Row permutations in and out of
                the buckets are gathers both ways (custom VJP), never scatter-adds. Reverse-mode only.
  grouped       sorted and padded like sorted_tiles, then grouped GEMMs over the row tiles with a tile -> expert
                map (ops/grouped_gemm.py: Pallas Triton on GPU, megablox on TPU); custom VJP: the backward
                GEMMs are grouped too. On XLA:GPU ragged_dot can be rewritten into a dense dot (E times the
                FLOPs), which this path cannot.
  auto          grouped on GPU and TPU; on CPU bucket_tiles up to expert width 128, sorted_tiles above.
  gather        each routed row's expert weights gathered per row ([N*K, d, F]) and one batched matmul: reads
                N*K expert weights, no sort and no loop. For decode steps, where N*K is a handful of rows
                (generate.py picks it for N*K <= 8 on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deepseek_jax.ops import fp8_grouped, grouped_gemm


# Expert FFNs: SwiGLU, down(silu(x W_gate) * (x W_up)), stacked over experts: W_gate/W_up [E, d, F], W_down [E, F, d]
# ---------------------------------------------------------------------------------------------------------------
def swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dispatch_dense(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int = 0):
    """Reference: every expert on every token; combine with a [N, E] weight matrix that is zero off-route."""
    N, E = x_nd.shape[0], wg.shape[0]
    # x broadcast over experts: a batched matmul reads each expert's weights in place ("nd,edf->enf" would make
    # XLA transpose all weights into one [d, E*F] operand first)
    x_end = jnp.broadcast_to(x_nd[None], (E,) + x_nd.shape)
    h = swiglu(jnp.einsum("end,edf->enf", x_end, wg), jnp.einsum("end,edf->enf", x_end, wu))
    y_end = jnp.einsum("enf,efd->end", h, wd)
    comb_ne = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_nk].add(w_nk)
    return jnp.einsum("ne,end->nd", comb_ne, y_end.astype(jnp.float32))


def _sort_by_expert(idx_nk, E):
    """Permutation of the N*K (token, slot) rows that groups them by expert (stable), and group sizes."""
    flat_e = idx_nk.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    return order, flat_e[order], sizes


def _unsort_combine(y_sorted, order, w_nk):
    N, K = w_nk.shape
    inv = jnp.argsort(order)
    y_nkd = y_sorted[inv].reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_nkd, w_nk)


def dispatch_ragged(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int = 0):
    K, E = idx_nk.shape[1], wg.shape[0]
    order, _, sizes = _sort_by_expert(idx_nk, E)
    x_sorted = x_nd[order // K]
    h = swiglu(jax.lax.ragged_dot(x_sorted, wg, sizes), jax.lax.ragged_dot(x_sorted, wu, sizes))
    y_sorted = jax.lax.ragged_dot(h.astype(x_nd.dtype), wd, sizes)
    return _unsort_combine(y_sorted, order, w_nk)


def _tile_layout(idx_nk, E: int, tile: int):
    """Where each routed row goes when rows are grouped by expert (stable) and each expert's group is padded to a
    multiple of `tile`: sum_e ceil(c_e / tile) <= ceil(NK / tile) + E - 1 =: n_tiles, a static bound; only the
    first `n_used` tiles hold rows and only they are computed.

    Returns (all int32)
      src      [P]       flat routed row (n * K + k) held by each padded slot; N*K for a padding slot
      dest     [N, K]    padded slot of each routed row (a bijection onto the non-padding slots)
      tile_e   [n_tiles] expert of each tile (E - 1 for the unused trailing tiles, which are never computed)
      n_used   []        number of tiles that hold rows
    """
    N, K = idx_nk.shape
    NK = N * K
    n_tiles = -(-NK // tile) + E - 1
    P = n_tiles * tile
    flat_e = idx_nk.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)
    e_sorted = flat_e[order]
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    padded = -(-sizes // tile) * tile
    pad_end = jnp.cumsum(padded, dtype=jnp.int32)
    pad_start = pad_end - padded
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    dest_sorted = pad_start[e_sorted] + jnp.arange(NK, dtype=jnp.int32) - start[e_sorted]
    dest = jnp.zeros((NK,), jnp.int32).at[order].set(dest_sorted, unique_indices=True)
    src = jnp.full((P,), NK, jnp.int32).at[dest_sorted].set(order, unique_indices=True)
    tile_e = jnp.searchsorted(pad_end, jnp.arange(n_tiles, dtype=jnp.int32) * tile, side="right")
    tile_e = jnp.minimum(tile_e, E - 1).astype(jnp.int32)
    n_used = (pad_end[-1] // tile).astype(jnp.int32)
    return src, dest.reshape(N, K), tile_e, n_used


def _rows(a, idx):
    """a[idx] along the first axis, zero where idx is out of range (a routed row with no slot)."""
    return a.at[idx].get(mode="fill", fill_value=0)


def _take(w, e):
    return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep: bool):
    """Loop over the used tiles only: tile t's rows times expert tile_e[t]'s weights (sliced, not gathered)."""
    K = dest_nk.shape[1]
    d, F = x_nd.shape[1], wg.shape[2]
    P, n_tiles = src.shape[0], tile_e.shape[0]
    tile = P // n_tiles
    # src // K is the token of each slot; padding slots (src == N*K) read the appended zero row N.
    x_pad = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K]

    def body(t, carry):
        r0 = t * tile
        e = tile_e[t]
        x_t = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile)
        a, b = x_t @ _take(wg, e), x_t @ _take(wu, e)
        y_t = swiglu(a, b) @ _take(wd, e)
        out = (jax.lax.dynamic_update_slice_in_dim(carry[0], y_t.astype(carry[0].dtype), r0, 0),)
        if keep:  # pre-activations, for the backward pass
            out += (jax.lax.dynamic_update_slice_in_dim(carry[1], a, r0, 0),
                    jax.lax.dynamic_update_slice_in_dim(carry[2], b, r0, 0))
        return out

    out_dt = jnp.result_type(x_nd.dtype, wd.dtype)
    act_dt = jnp.result_type(x_nd.dtype, wg.dtype)
    init = (jnp.zeros((P, d), out_dt),)
    if keep:
        init += (jnp.zeros((P, F), act_dt), jnp.zeros((P, F), act_dt))
    out = jax.lax.fori_loop(0, n_used, body, init)
    return out[0][dest_nk], (x_pad,) + tuple(out[1:])


@jax.custom_vjp
def _tiled_ffn(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used):
    """SwiGLU_{e}(x_n) for every routed row (n, k), as [N, K, d] in the compute dtype."""
    return _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep=False)[0]


def _tiled_ffn_fwd(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used):
    y, (x_pad, a_pad, b_pad) = _tiled_ffn_forward(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used, keep=True)
    return y, (x_nd, x_pad, a_pad, b_pad, wg, wu, wd, src, dest_nk, tile_e, n_used)


def _swiglu_tile_bwd(x_t, dy_t, a, b, e, wg, wu, wd, dwg, dwu, dwd):
    """One tile's backward through SwiGLU_e: from its rows x_t, their cotangents dy_t and the saved pre-activations
    a = x W_gate, b = x W_up (fp32), the rows' input gradient dx_t (fp32) and expert e's weight gradients added
    (fp32, in place) into its slices of dwg / dwu / dwd."""
    f32 = jnp.float32
    tn = (((0,), (0,)), ((), ()))  # A^T B
    nt = (((1,), (1,)), ((), ()))  # A B^T
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = (silu * b).astype(x_t.dtype)
    dh = jax.lax.dot_general(dy_t, _take(wd, e), nt, preferred_element_type=f32)
    da = (dh * b * (sig * (1 + a * (1 - sig)))).astype(x_t.dtype)
    db = (dh * silu).astype(x_t.dtype)

    def acc(w, g):
        return jax.lax.dynamic_update_index_in_dim(w, _take(w, e) + g, e, 0)

    dwd = acc(dwd, jax.lax.dot_general(h, dy_t, tn, preferred_element_type=f32))
    dwg = acc(dwg, jax.lax.dot_general(x_t, da, tn, preferred_element_type=f32))
    dwu = acc(dwu, jax.lax.dot_general(x_t, db, tn, preferred_element_type=f32))
    dx_t = (jax.lax.dot_general(da, _take(wg, e), nt, preferred_element_type=f32)
            + jax.lax.dot_general(db, _take(wu, e), nt, preferred_element_type=f32))
    return dx_t, dwg, dwu, dwd


def _tiled_ffn_bwd(res, ct_nkd):
    """Same tile loop backwards; expert weight grads accumulate (fp32) in place into their expert's slice, and the
    row permutations are undone by gathers (src/dest are inverse bijections), never scatter-adds."""
    x_nd, x_pad, a_pad, b_pad, wg, wu, wd, src, dest_nk, tile_e, n_used = res
    N, K = dest_nk.shape
    d = x_nd.shape[1]
    P, n_tiles = src.shape[0], tile_e.shape[0]
    tile = P // n_tiles
    f32 = jnp.float32
    ct_flat = ct_nkd.reshape(N * K, d)
    ct_pad = jnp.concatenate([ct_flat, jnp.zeros((1, d), ct_flat.dtype)])[src]  # zero on padding slots

    def body(t, carry):
        dx_pad, dwg, dwu, dwd = carry
        r0 = t * tile
        e = tile_e[t]
        x_t = jax.lax.dynamic_slice_in_dim(x_pad, r0, tile)
        dy_t = jax.lax.dynamic_slice_in_dim(ct_pad, r0, tile).astype(x_t.dtype)
        a = jax.lax.dynamic_slice_in_dim(a_pad, r0, tile).astype(f32)
        b = jax.lax.dynamic_slice_in_dim(b_pad, r0, tile).astype(f32)
        dx_t, dwg, dwu, dwd = _swiglu_tile_bwd(x_t, dy_t, a, b, e, wg, wu, wd, dwg, dwu, dwd)
        dx_pad = jax.lax.dynamic_update_slice_in_dim(dx_pad, dx_t, r0, 0)
        return dx_pad, dwg, dwu, dwd

    init = (jnp.zeros((P, d), f32), jnp.zeros(wg.shape, f32), jnp.zeros(wu.shape, f32), jnp.zeros(wd.shape, f32))
    dx_pad, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
    dx = dx_pad[dest_nk].sum(1)  # each token's K routed rows
    return (dx.astype(x_nd.dtype), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype),
            None, None, None, None)


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def _row_tiles_forward(x_nd, wg, wu, wd, y_nkd, src, tile_e, n_used, K: int):
    """The tile loop of ``_tiled_ffn`` for a layout that holds only some routed rows, writing their outputs into
    ``y_nkd``, with no buffer of the layout's padded size: each used tile gathers its rows of x and scatters its
    outputs to their routed rows (the padding slots, src == N*K, are dropped), so a loop over few tiles costs
    few tiles."""
    N, d = x_nd.shape
    tile = src.shape[0] // tile_e.shape[0]

    def body(t, y):
        e = tile_e[t]
        s_t = jax.lax.dynamic_slice_in_dim(src, t * tile, tile)
        x_t = _rows(x_nd, s_t // K)  # a padding slot reads row N: zero
        y_t = swiglu(x_t @ _take(wg, e), x_t @ _take(wu, e)) @ _take(wd, e)
        return y.at[s_t].set(y_t.astype(y.dtype), mode="drop", unique_indices=True)

    return jax.lax.fori_loop(0, n_used, body, y_nkd.reshape(N * K, d)).reshape(N, K, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _row_tiles_ffn(x_nd, wg, wu, wd, y_nkd, src, tile_e, n_used, K):
    """``y_nkd`` with the routed rows (n, k) that ``src`` lays out replaced by SwiGLU_{e}(x_n): [N, K, d]."""
    return _row_tiles_forward(x_nd, wg, wu, wd, y_nkd, src, tile_e, n_used, K)


def _row_tiles_ffn_fwd(x_nd, wg, wu, wd, y_nkd, src, tile_e, n_used, K):
    y = _row_tiles_forward(x_nd, wg, wu, wd, y_nkd, src, tile_e, n_used, K)
    return y, (x_nd, wg, wu, wd, src, tile_e, n_used)


def _row_tiles_ffn_bwd(K, res, ct_nkd):
    """The same loop backwards (the math of ``_tiled_ffn_bwd``): each tile gathers its rows' cotangents, computes
    its rows' pre-activations again (no buffer of them is kept from the forward pass: the overflow is a few tiles),
    accumulates its expert's weight gradients (fp32) and scatter-adds its rows' input gradients to their tokens
    (a tile holds one expert's rows, so each token at most once). ``y_nkd``'s cotangent is ``ct_nkd`` except on
    the rows the loop replaced."""
    x_nd, wg, wu, wd, src, tile_e, n_used = res
    N, d = x_nd.shape
    tile = src.shape[0] // tile_e.shape[0]
    f32 = jnp.float32
    ct_rd = ct_nkd.reshape(N * K, d)

    def body(t, carry):
        dx, dwg, dwu, dwd = carry
        e = tile_e[t]
        s_t = jax.lax.dynamic_slice_in_dim(src, t * tile, tile)
        x_t = _rows(x_nd, s_t // K)
        dy_t = _rows(ct_rd, s_t).astype(x_t.dtype)
        a, b = ((x_t @ _take(w, e)).astype(f32) for w in (wg, wu))
        dx_t, dwg, dwu, dwd = _swiglu_tile_bwd(x_t, dy_t, a, b, e, wg, wu, wd, dwg, dwu, dwd)
        return dx.at[s_t // K].add(dx_t, mode="drop", unique_indices=True), dwg, dwu, dwd

    init = (jnp.zeros((N, d), f32), jnp.zeros(wg.shape, f32), jnp.zeros(wu.shape, f32), jnp.zeros(wd.shape, f32))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
    dy = ct_rd.at[src].set(0, mode="drop").reshape(ct_nkd.shape)
    return (dx.astype(x_nd.dtype), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype), dy,
            None, None, None)


_row_tiles_ffn.defvjp(_row_tiles_ffn_fwd, _row_tiles_ffn_bwd)


def dispatch_sorted_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int):
    """Rows grouped by expert and padded per expert to whole tiles; a loop over the used tiles does one
    [tile, d] x [d, F] (gate, up) and [tile, F] x [F, d] (down) matmul with that tile's expert's weights, sliced in
    place. Only routed rows plus < 1 tile of padding per expert are computed; unused tiles of the static bound are
    skipped. Custom VJP: the backward pass is the same loop (see _tiled_ffn_bwd)."""
    src, dest_nk, tile_e, n_used = _tile_layout(idx_nk, wg.shape[0], tile)
    y_nkd = _tiled_ffn(x_nd, wg, wu, wd, src, dest_nk, tile_e, n_used)
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)


OVERFLOW_TILE = 32  # rows per tile of bucket_tiles' overflow loop: an expert's overflow is usually a few rows


def bucket_capacity(n_routed: int, n_experts: int) -> int:
    """Rows per expert bucket of ``bucket_tiles``: the mean load N*K/E, rounded down (a bucket row that no routed
    row fills is computed anyway, so short inputs, e.g. a prefill of a few tokens over many experts, get small or
    no buckets and go through the overflow tiles instead)."""
    return n_routed // n_experts


def _bucket_layout(idx_nk, E: int, C: int, tile: int):
    """Rows grouped by expert (one stable sort): each expert's first C rows fill its bucket (slot e*C + rank), the
    rest (its overflow, max(c_e - C, 0) rows) are padded per expert to whole tiles of ``tile`` rows, as in
    ``_tile_layout``. The overflow needs at most n_tiles = ceil((NK - C) / tile) + E - 1 tiles, a static bound.

    Returns (int32 unless noted)
      src       [E*C]      flat routed row (n * K + k) in each bucket slot; N*K for an empty slot
      dest      [N, K]     bucket slot of each routed row; E*C (none) for an overflow row
      in_bucket [N, K]     bool, dest < E*C
      o_src     [n_tiles * tile]  flat routed row in each overflow tile slot; N*K for a padding slot
      o_tile_e  [n_tiles]  expert of each overflow tile (E - 1 for the unused trailing ones)
      o_used    []         number of overflow tiles that hold rows (0 when no expert has more than C rows)
    """
    N, K = idx_nk.shape
    NK = N * K
    flat_e = idx_nk.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_e, stable=True).astype(jnp.int32)
    e_sorted = flat_e[order]
    sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    rank_sorted = jnp.arange(NK, dtype=jnp.int32) - start[e_sorted]
    slot_sorted = jnp.where(rank_sorted < C, e_sorted * C + rank_sorted, E * C)
    dest = jnp.zeros((NK,), jnp.int32).at[order].set(slot_sorted, unique_indices=True)
    src = jnp.full((E * C,), NK, jnp.int32).at[slot_sorted].set(order, mode="drop")
    # the overflow: rank >= C, laid out like _tile_layout's tiles
    n_tiles = -(-max(NK - C, 1) // tile) + E - 1
    over = jnp.maximum(sizes - C, 0)
    padded = -(-over // tile) * tile
    pad_end = jnp.cumsum(padded, dtype=jnp.int32)
    o_slot_sorted = jnp.where(rank_sorted >= C, (pad_end - padded)[e_sorted] + rank_sorted - C, n_tiles * tile)
    o_src = jnp.full((n_tiles * tile,), NK, jnp.int32).at[o_slot_sorted].set(order, mode="drop")
    o_tile_e = jnp.searchsorted(pad_end, jnp.arange(n_tiles, dtype=jnp.int32) * tile, side="right")
    o_tile_e = jnp.minimum(o_tile_e, E - 1).astype(jnp.int32)
    o_used = (pad_end[-1] // tile).astype(jnp.int32)
    return src, dest.reshape(N, K), (dest < E * C).reshape(N, K), o_src, o_tile_e, o_used


@jax.custom_vjp
def _permute_rows(a_md, idx_r, inv_mj):
    """out[r] = a[idx[r]] (zero where idx[r] >= M): a row gather whose transpose is another gather, never a
    scatter-add: ``inv_mj`` lists, for every row m of ``a``, the J output rows that read it (>= R: none)."""
    return _rows(a_md, idx_r)


def _permute_rows_fwd(a_md, idx_r, inv_mj):
    return _rows(a_md, idx_r), (idx_r, inv_mj)


def _permute_rows_bwd(res, ct_rd):
    idx_r, inv_mj = res
    return _rows(ct_rd, inv_mj).sum(1), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def dispatch_bucket_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int):
    """Each expert's first C = ``bucket_capacity`` routed rows in a bucket [E, C, d], the three expert GEMMs
    batched over the buckets (one batched matmul each, weights read in place); the rows past an expert's first C
    (the overflow: none when loads are balanced, a few tiles when not) through a tile loop of ``OVERFLOW_TILE``-row
    tiles (``_row_tiles_ffn``). Still dropless, the same function as ``dense``. On CPU, at expert widths up to 128,
    the batched GEMMs beat the tile loop's many small matmuls; at 512 they do not
    (benchmarks/results/moe_dispatch_bench_width_cpu.md, moe_dispatch_cpu.md)."""
    N, K = idx_nk.shape
    E = wg.shape[0]
    C = bucket_capacity(N * K, E)
    src, dest_nk, _, o_src, o_tile_e, o_used = _bucket_layout(idx_nk, E, C, min(tile, OVERFLOW_TILE))
    if C:
        x_cd = _permute_rows(x_nd, src // K, dest_nk)  # slot -> its token (N: the zero row of an empty slot)
        x_ecd = x_cd.reshape(E, C, -1)
        h_ecf = swiglu(jnp.einsum("ecd,edf->ecf", x_ecd, wg), jnp.einsum("ecd,edf->ecf", x_ecd, wu))
        y_cd = jnp.einsum("ecf,efd->ecd", h_ecf.astype(x_nd.dtype), wd).reshape(E * C, -1)
        y_nkd = _permute_rows(y_cd, dest_nk.reshape(-1), src[:, None]).reshape(N, K, -1)  # 0 on overflow rows
    else:
        y_nkd = jnp.zeros((N, K, x_nd.shape[1]), jnp.result_type(x_nd.dtype, wd.dtype))
    y_nkd = _row_tiles_ffn(x_nd, wg, wu, wd, y_nkd, o_src, o_tile_e, o_used, K)  # the overflow rows written in
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)


def dispatch_fp8_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int, linear_fn):
    """The routed experts through the FP8 linear (ops/fp8.py; ``ModelConfig.fp8``), whatever moe_dispatch
    says: rows grouped by expert and padded to whole tiles (as sorted_tiles), then every tile of the static bound
    is one ``linear_fn([tile, d], W_e)`` with its expert's weights (vmapped; unused tiles compute zeros). Each
    tile's GEMMs quantize like any FP8 linear (1x128 activation tiles, 128x128 expert-weight blocks; the Wgrad's
    token tiles are at most ``tile`` rows); the expert weight gradient is the fp32 sum over its tiles. Correct,
    reverse-mode differentiable, about (NK + (E-1) tile)/NK times the routed FLOPs: for correctness, not speed."""
    E, K = wg.shape[0], idx_nk.shape[1]
    d = x_nd.shape[1]
    src, dest_nk, tile_e, _ = _tile_layout(idx_nk, E, tile)
    n_tiles = tile_e.shape[0]
    x_ttd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K].reshape(n_tiles, tile, d)
    lin = jax.vmap(linear_fn)
    h_ttf = swiglu(lin(x_ttd, wg[tile_e]), lin(x_ttd, wu[tile_e]))
    y_pd = lin(h_ttf.astype(x_nd.dtype), wd[tile_e]).reshape(n_tiles * tile, d)
    return jnp.einsum("nkd,nk->nd", y_pd[dest_nk].astype(jnp.float32), w_nk)


def dispatch_fp8_grouped(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int, linear_fn):
    """The routed experts through grouped FP8 kernels (ops/fp8_grouped.py), the same contract as
    :func:`dispatch_fp8_tiles` except that ``linear_fn(x_pk, w_ekn, tile_e)`` is a grouped linear
    (``fp8_grouped.grouped_linear_fn(cfg)``): rows grouped by expert in DeepGEMM's contiguous layout, every
    expert's segment padded to a multiple of 128 rows (``tile`` is rounded up to one), then one grouped GEMM per
    projection over all tiles (gate, up, down), each tile with its expert's weights. Unused tiles of the static
    bound hold zero rows and are computed (zeros)."""
    E, K = wg.shape[0], idx_nk.shape[1]
    d = x_nd.shape[1]
    tile = -(-max(tile, 128) // 128) * 128
    src, dest_nk, tile_e, _ = _tile_layout(idx_nk, E, tile)
    rep = tile // 128  # tile_e per 128-row block
    te = jnp.repeat(tile_e, rep)
    x_pd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K]
    h_pf = swiglu(linear_fn(x_pd, wg, te), linear_fn(x_pd, wu, te))
    y_pd = linear_fn(h_pf.astype(x_nd.dtype), wd, te)
    return jnp.einsum("nkd,nk->nd", y_pd[dest_nk].astype(jnp.float32), w_nk)


def dispatch_grouped(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int, backend: str = "auto"):
    """Rows grouped by expert and padded per expert to whole tiles (as sorted_tiles), then the three expert GEMMs
    as grouped GEMMs over the row tiles (ops/grouped_gemm.py: a Pallas Triton kernel on GPU, megablox on TPU,
    chosen per lowering platform; interpret mode on CPU). Each tile multiplies only its own expert's weights, in
    the forward and both backward GEMMs, so nothing is computed densely over the experts. Returns fp32 [N, d]."""
    E, K = wg.shape[0], idx_nk.shape[1]
    d = x_nd.shape[1]
    src, dest_nk, tile_e, _ = _tile_layout(idx_nk, E, tile)
    tiles_e = -(-jnp.bincount(idx_nk.reshape(-1), length=E).astype(jnp.int32) // tile)
    tile_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles_e, dtype=jnp.int32)])
    x_pd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[src // K]  # padding slots read zero row N
    gmm = functools.partial(grouped_gemm.grouped_matmul, tile_e=tile_e, tile_start=tile_start, tile=tile,
                            backend=backend)
    h_pf = swiglu(gmm(x_pd, wg), gmm(x_pd, wu))
    y_pd = gmm(h_pf.astype(x_nd.dtype), wd)
    return jnp.einsum("nkd,nk->nd", y_pd[dest_nk].astype(jnp.float32), w_nk)


def dispatch_gather(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int = 0):
    """Every routed row (n, k) times its expert's weights gathered for that row (decode-sized N*K only: it reads
    N*K copies of an expert's weights)."""
    h_nkf = swiglu(jnp.einsum("nd,nkdf->nkf", x_nd, wg[idx_nk]), jnp.einsum("nd,nkdf->nkf", x_nd, wu[idx_nk]))
    y_nkd = jnp.einsum("nkf,nkfd->nkd", h_nkf.astype(x_nd.dtype), wd[idx_nk])
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), w_nk)


# name -> dispatch; every entry computes the same function, (x_nd, idx_nk, w_nk, wg, wu, wd, tile) -> fp32 [N, d].
# A new dispatch is one function here and its name in config.MOE_DISPATCHES (BUILD.md "Architecture").
DISPATCHES = {
    "dense": dispatch_dense,
    "ragged": dispatch_ragged,
    "sorted_tiles": dispatch_sorted_tiles,
    "bucket_tiles": dispatch_bucket_tiles,
    "gather": dispatch_gather,
    "grouped": dispatch_grouped,
}


BUCKET_MAX_WIDTH = 128  # auto on CPU: bucket_tiles up to this expert width F, sorted_tiles above


def resolve_dispatch(name: str, width: int = 0) -> str:
    """"auto" -> the platform's choice: the grouped GEMM on GPU and TPU; on CPU bucket_tiles for expert widths
    ``width`` (F) up to BUCKET_MAX_WIDTH, where the tile loop's small matmuls are slow, and sorted_tiles above it,
    where they are not (benchmarks/results/moe_dispatch_*cpu.md: bucket_tiles wins at F = 64 and 128 and loses at
    F = 512; between them it is unmeasured). Other names pass through."""
    if name == "auto":
        if jax.default_backend() != "cpu":
            return "grouped"
        return "bucket_tiles" if width <= BUCKET_MAX_WIDTH else "sorted_tiles"
    return name


def routed_experts(x_nd, idx_nk, w_nk, wg, wu, wd, dispatch: str, tile: int = 128):
    """sum_k g_k * FFN_{e_k}(x) for every token, by the named dispatch. Returns fp32 [N, d]."""
    name = resolve_dispatch(dispatch, wg.shape[2])
    if name not in DISPATCHES:
        raise ValueError(f"moe_dispatch: unknown dispatch {dispatch!r}; known: {sorted(DISPATCHES)}")
    return DISPATCHES[name](x_nd, idx_nk, w_nk, wg, wu, wd, tile=tile)


@dataclasses.dataclass(frozen=True)
class LocalDispatch:
    """The routed experts on this device: the MoE layer's default dispatch strategy.

    A strategy maps (x_nd, idx_nk, w_nk, wg, wu, wd, fp8) to (y fp32 [N, d], aux dict); ``fp8`` is the model's FP8
    policy (``ops.fp8.Fp8DotGeneral``) or None. With it the experts' GEMMs go through FP8, whatever ``name`` says:
    grouped FP8 kernels (dispatch_fp8_grouped) for the Pallas backend, else the per-tile FP8 linear
    (dispatch_fp8_tiles). ops/expert_parallel.py's ExpertParallelDispatch is the other strategy."""

    name: str = "auto"
    tile: int = 128

    def __call__(self, x_nd, idx_nk, w_nk, wg, wu, wd, fp8=None):
        if fp8 is not None and fp8.cfg.backend == "pallas":
            grouped = fp8_grouped.grouped_linear_fn(fp8.cfg)
            return dispatch_fp8_grouped(x_nd, idx_nk, w_nk, wg, wu, wd, self.tile, grouped), {}
        if fp8 is not None:
            return dispatch_fp8_tiles(x_nd, idx_nk, w_nk, wg, wu, wd, self.tile, fp8.linear_fn), {}
        return routed_experts(x_nd, idx_nk, w_nk, wg, wu, wd, self.name, self.tile), {}
