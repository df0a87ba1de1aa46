"""The expert-parallel dispatch on its own (deepseek_jax/ops/expert_parallel.py), against a numpy loop over
(token, k): values, gradients, and which rows a capacity-limited buffer drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops.moe_dispatch import dispatch_dense
from deepseek_jax.ops import expert_parallel
from deepseek_jax import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")

N, D, F, E, K = 32, 16, 8, 8, 2


def _problem(seed=0):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(N, D)).astype(np.float32)
    idx = np.stack([rs.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    idx[:12] = [0, 1]  # a hot pair: ranks 0 gets far more than its share (exercises capacity)
    w = rs.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
    wg, wu = (rs.normal(scale=0.3, size=(E, D, F)).astype(np.float32) for _ in range(2))
    wd = rs.normal(scale=0.3, size=(E, F, D)).astype(np.float32)
    return x, idx, w, wg, wu, wd


def _numpy_reference(x, idx, w, wg, wu, wd, n_chunks, n_ep, cap):
    """Loop over tokens and their K routes; a row is kept iff it is among the first `cap` rows (in (token, k)
    order) that its source chunk sends to its destination rank (expert // (E / n_ep))."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    y = np.zeros((N, D))
    dropped = 0
    per_chunk = N // n_chunks
    for c in range(n_chunks):
        sent = np.zeros(n_ep, int)
        for n in range(c * per_chunk, (c + 1) * per_chunk):
            for k in range(K):
                e = idx[n, k]
                dest = e // (E // n_ep)
                sent[dest] += 1
                if sent[dest] > cap:
                    dropped += 1
                    continue
                a, b = x[n] @ wg[e], x[n] @ wu[e]
                y[n] += w[n, k] * ((a / (1 + np.exp(-a)) * b) @ wd[e])
    return y, dropped


def _run(mesh, args, capacity_factor=None):
    def f(*a):
        with sharding.use_mesh(mesh):
            return expert_parallel.routed_experts(*a, dispatch="dense", capacity_factor=capacity_factor)
    return jax.jit(f)(*args)


@pytest.mark.parametrize("spec", [{"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}],
                         ids=["data2xexpert4", "fsdp2xexpert2xtensor2"])
def test_dropless_values_and_gradients(spec):
    args = _problem()
    mesh = sharding.make_mesh(spec)
    n_ep, n_chunks = spec.get("expert", 1), sharding.batch_axes_size(sharding.mesh_shape(spec))
    y, dropped = _run(mesh, args)
    want, want_dropped = _numpy_reference(*args, n_chunks, n_ep, cap=N * K)
    assert int(dropped) == want_dropped == 0
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)

    r = np.random.RandomState(1).normal(size=(N, D)).astype(np.float32)

    def loss_ep(x, w, wg, wu, wd):
        with sharding.use_mesh(mesh):
            y, _ = expert_parallel.routed_experts(x, args[1], w, wg, wu, wd, dispatch="dense")
        return jnp.sum(y * r)

    def loss_ref(x, w, wg, wu, wd):
        return jnp.sum(dispatch_dense(x, args[1], w, wg, wu, wd) * r)

    diff = (0, 2, 3, 4, 5)
    ref_args = [args[i] for i in diff]
    g_ep = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4)))(*ref_args)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(*ref_args)
    for name, a, b in zip(("x", "w", "wg", "wu", "wd"), g_ep, g_ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name


def test_capacity_drops_the_rows_over_capacity_and_reports_them():
    args = _problem()
    spec = {"data": 2, "expert": 4}
    mesh = sharding.make_mesh(spec)
    n_local = N // 8
    cap = expert_parallel.capacity(n_local, K, 4, 1.0)  # ceil(4 * 2 / 4) = 2 rows per peer
    assert cap == 2
    y, dropped = _run(mesh, args, capacity_factor=1.0)
    want, want_dropped = _numpy_reference(*args, 8, 4, cap)
    assert want_dropped > 0 and int(dropped) == want_dropped
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_no_mesh_and_bad_shapes_raise():
    x, idx, w, wg, wu, wd = _problem()
    with pytest.raises(ValueError, match="needs a mesh"):
        expert_parallel.routed_experts(x, idx, w, wg, wu, wd)
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    with pytest.raises(ValueError, match="not divisible by the mesh's expert axis"):
        expert_parallel.routed_experts(x, idx, w, wg[:6], wu[:6], wd[:6], mesh=mesh)
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        expert_parallel.capacity(4, 2, 4, 0.0)
