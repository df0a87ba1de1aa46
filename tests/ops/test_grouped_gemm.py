"""The grouped expert GEMM (ops/grouped_gemm.py) and the "grouped" dispatch (ops/moe_dispatch.py).

Interpret-mode Pallas on CPU against independent references: a float64 numpy loop over tiles for the bare GEMM,
``dispatch_dense`` (every expert on every token) for the dispatch, values and gradients. Lowered for cuda and tpu
on this CPU host: the module holds the grouped kernel's custom call and no dot_general with an expert-sized batch
dimension (the dense check is itself checked against dispatch_dense, which must fail it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import compat
from deepseek_jax.config import preset
from deepseek_jax.ops import grouped_gemm, moe_dispatch

GRID_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _problem(N=12, K=2, E=4, d=24, F=40, seed=0, dtype=jnp.float32, skip_expert=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(ks[0], (N, d), dtype)
    idx = jax.random.randint(ks[1], (N, K), 0, E)
    if skip_expert is not None:  # an expert no token routes to (an empty group)
        idx = jnp.where(idx == skip_expert, (skip_expert + 1) % E, idx)
    w = jax.random.uniform(ks[2], (N, K))
    wg = (jax.random.normal(ks[3], (E, d, F)) * 0.2).astype(dtype)
    wu = (jax.random.normal(ks[4], (E, d, F)) * 0.2).astype(dtype)
    wd = (jax.random.normal(ks[5], (E, F, d)) * 0.2).astype(dtype)
    return x, idx, w, wg, wu, wd


def _loss(fn, idx):
    return lambda x, w, wg, wu, wd: (fn(x, idx, w, wg, wu, wd) ** 2).sum()


@pytest.mark.parametrize("backend", ["triton", "megablox"])
def test_grouped_matmul_equals_numpy_tile_loop(backend):
    """y[t] = x[t] W_{tile_e[t]} for the tiles in use, zeros after; dx, dW by the float64 transposed loops."""
    tile, E, k, n = 8, 3, 20, 12
    tiles_e = np.array([2, 0, 3])  # expert 1 owns no tile
    tile_start = np.concatenate([[0], np.cumsum(tiles_e)]).astype(np.int32)
    n_tiles = int(tiles_e.sum()) + 2  # two unused tiles at the end (the static bound's tail)
    tile_e = np.concatenate([np.repeat(np.arange(E), tiles_e), [E - 1, E - 1]]).astype(np.int32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_tiles * tile, k)).astype(np.float32)
    w = rng.standard_normal((E, k, n)).astype(np.float32)
    ct = rng.standard_normal((n_tiles * tile, n)).astype(np.float32)
    used = int(tiles_e.sum())
    y_ref = np.zeros((n_tiles * tile, n))
    dx_ref = np.zeros_like(x, np.float64)
    dw_ref = np.zeros(w.shape)
    for t in range(used):
        r = slice(t * tile, (t + 1) * tile)
        y_ref[r] = x[r].astype(np.float64) @ w[tile_e[t]]
        dx_ref[r] = ct[r].astype(np.float64) @ w[tile_e[t]].T.astype(np.float64)
        dw_ref[tile_e[t]] += x[r].T.astype(np.float64) @ ct[r]

    def f(x, w):
        return grouped_gemm.grouped_matmul(x, w, jnp.asarray(tile_e), jnp.asarray(tile_start), tile=tile,
                                           backend=backend, interpret=True)

    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(ct))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx)[:used * tile], dx_ref[:used * tile], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(dw)[1] == 0)  # the empty expert gets an exact zero gradient


@pytest.mark.parametrize("backend", ["triton", "megablox"])
def test_dispatch_grouped_equals_dense(backend):
    """Values and gradients (x, gate weights, all three expert weights) equal to dispatch_dense, with an empty
    expert and a tile smaller than some experts' row counts."""
    x, idx, w, wg, wu, wd = _problem(skip_expert=2)
    f = lambda *a: moe_dispatch.dispatch_grouped(*a, tile=8, backend=backend)
    y = jax.jit(f)(x, idx, w, wg, wu, wd)
    y_ref = moe_dispatch.dispatch_dense(x, idx, w, wg, wu, wd)
    assert y.dtype == jnp.float32 and y.shape == y_ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(_loss(f, idx), argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd)
    g_ref = jax.grad(_loss(moe_dispatch.dispatch_dense, idx), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)
    for name, a, b in zip(("x", "w", "wg", "wu", "wd"), g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)


def test_routed_experts_grouped_and_auto():
    """moe_dispatch="grouped" goes through routed_experts (the per-platform choice, interpret mode on CPU);
    "auto" is bucket_tiles on CPU and "grouped" elsewhere."""
    x, idx, w, wg, wu, wd = _problem(seed=1)
    y = moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, "grouped", 8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(moe_dispatch.dispatch_dense(x, idx, w, wg, wu, wd)),
                               rtol=1e-5, atol=1e-5)
    assert moe_dispatch.resolve_dispatch("auto") == "bucket_tiles"  # this host is a CPU
    assert preset("tiny", moe_dispatch="grouped").moe_dispatch == "grouped"


def test_grouped_matmul_bad_input():
    x = jnp.zeros((16, 4))
    with pytest.raises(ValueError, match="backend"):
        grouped_gemm.grouped_matmul(x, jnp.zeros((2, 4, 3)), jnp.zeros(2, jnp.int32), jnp.zeros(3, jnp.int32),
                                    tile=8, backend="cutlass")
    with pytest.raises(ValueError, match="tile_e"):
        grouped_gemm.grouped_matmul(x, jnp.zeros((2, 4, 3)), jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32),
                                    tile=8)


# --- lowered for accelerators on this CPU host ------------------------------------------------------------------
_DOT = re.compile(r"stablehlo\.dot_general[^\n]*?batching_dims = \[([\d, ]*)\] x \[[\d, ]*\][^\n]*?: \(tensor<([^>]*)>")


def dot_batch_sizes(module_text: str):
    """The batch-dimension sizes of every dot_general in a StableHLO module (lhs side)."""
    out = []
    for dims, lhs in _DOT.findall(module_text):
        shape = [int(s) for s in lhs.split("x")[:-1]]
        out.append(tuple(shape[int(i)] for i in dims.split(",") if i.strip()))
    return out


def lower_text(fn, args, platform: str) -> str:
    ctx = compat.gpu_lowering_target() if platform == "cuda" else _null()
    with ctx:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


E_LOWER = 8  # an expert count no other dimension of the lowered problem has


def _lower_args(dtype=jnp.bfloat16):
    N, K, d, F = 64, 2, 128, 96
    S = jax.ShapeDtypeStruct
    return (S((N, d), dtype), S((N, K), jnp.int32), S((N, K), jnp.float32), S((E_LOWER, d, F), dtype),
            S((E_LOWER, d, F), dtype), S((E_LOWER, F, d), dtype))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grouped_lowers_to_kernel_and_never_dense(platform):
    """Forward and train (grad) lowered for cuda / tpu: the grouped kernel's custom call is there and no dot_general
    has a batch dimension of size E (no expert GEMM over all rows); dispatch_dense lowered alike fails the check."""
    def fwd(x, idx, w, wg, wu, wd):
        return moe_dispatch.dispatch_grouped(x, idx, w, wg, wu, wd, tile=16)

    def train(x, idx, w, wg, wu, wd):
        return jax.grad(lambda *a: fwd(a[0], idx, *a[1:]).sum(), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)

    args = _lower_args()
    for fn in (fwd, train):
        txt = lower_text(fn, args, platform)
        assert GRID_CALL[platform] in txt
        other = GRID_CALL["tpu" if platform == "cuda" else "cuda"]
        assert other not in txt  # platform_dependent lowered only this platform's branch
        assert all(E_LOWER not in b for b in dot_batch_sizes(txt)), dot_batch_sizes(txt)
    dense_txt = lower_text(lambda *a: moe_dispatch.dispatch_dense(*a), args, platform)
    assert any(E_LOWER in b for b in dot_batch_sizes(dense_txt))  # the check can fail


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_picks_grouped_on_accelerators(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert moe_dispatch.resolve_dispatch("auto") == "grouped"
    assert moe_dispatch.resolve_dispatch("ragged") == "ragged"  # still selectable
