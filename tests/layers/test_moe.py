"""Router against a plain-Python transcription of the semantics; every dispatch against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config
from deepseek_jax.layers import moe, router
from deepseek_jax.ops import moe_dispatch


def route_reference(scores, bias, cfg):
    """Plain loops, float32, ties to the lower index: PAPER.md 'Router' steps 1-4."""
    N, E = scores.shape
    G, m = cfg.n_group, E // cfg.n_group
    weights, ids = [], []
    for n in range(N):
        s = scores[n].astype(np.float32)
        b = (s + bias.astype(np.float32)).astype(np.float32)
        allowed = set(range(E))
        if cfg.topk_group < G:
            gscore = []
            for g in range(G):
                vals = sorted(b[g * m:(g + 1) * m].tolist(), reverse=True)
                gscore.append(np.float32(vals[0]) + np.float32(vals[1]))
            kept = sorted(range(G), key=lambda g: (-gscore[g], g))[:cfg.topk_group]
            allowed = {e for e in range(E) if e // m in kept}
        masked = [b[e] if e in allowed else -np.inf for e in range(E)]
        chosen = sorted(range(E), key=lambda e: (-masked[e], e))[:cfg.num_experts_per_tok]
        w = s[chosen].astype(np.float32)
        if cfg.norm_topk_prob:
            w = w / (w.sum() + np.float32(1e-20))
        weights.append(w * np.float32(cfg.routed_scaling_factor))
        ids.append(chosen)
    return np.array(weights), np.array(ids)


CFG = config.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)


@pytest.mark.parametrize("case", ["random", "ties", "negative_bias", "no_norm", "single_group"])
def test_router_matches_reference(case):
    rng = np.random.default_rng(0)
    cfg = CFG
    scores = 1 / (1 + np.exp(-rng.standard_normal((64, 16)))).astype(np.float32)
    bias = (rng.standard_normal(16) * 0.1).astype(np.float32)
    if case == "ties":  # coarse values: many exact ties between experts and between groups
        scores = (np.round(scores * 4) / 4).astype(np.float32)
        bias = np.zeros(16, np.float32)
    if case == "negative_bias":  # biased scores mostly negative: masks must be -inf, not 0
        bias = (-1.0 - rng.random(16)).astype(np.float32)
    if case == "no_norm":
        cfg = cfg.replace(norm_topk_prob=False, routed_scaling_factor=16.0)
    if case == "single_group":
        cfg = cfg.replace(n_group=1, topk_group=1)
    w, idx = router.route(jnp.asarray(scores), jnp.asarray(bias), cfg)
    w_ref, idx_ref = route_reference(scores, bias, cfg)
    np.testing.assert_array_equal(np.asarray(idx), idx_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)


def test_router_negative_scores_never_pick_masked_groups():
    cfg = CFG
    rng = np.random.default_rng(1)
    scores = rng.random((32, 16)).astype(np.float32) * 0.1
    bias = np.full(16, -5.0, np.float32)
    bias[:4] = -0.5  # group 0 clearly best, others all far below zero
    bias[4:8] = -0.6  # group 1 second
    _, idx = router.route(jnp.asarray(scores), jnp.asarray(bias), cfg)
    assert np.all(np.asarray(idx) < 8), "an expert from a masked group was selected"


def test_bias_changes_selection_not_weights():
    cfg = CFG
    rng = np.random.default_rng(2)
    scores = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((16, 16)))), jnp.float32)
    bias = np.zeros(16, np.float32)
    bias[5] = 10.0  # force expert 5 everywhere
    w, idx = router.route(scores, jnp.asarray(bias), cfg.replace(norm_topk_prob=False, routed_scaling_factor=1.0))
    idx = np.asarray(idx)
    assert np.all((idx == 5).any(1))
    rows = np.arange(16)[:, None]
    np.testing.assert_array_equal(np.asarray(w), np.asarray(scores)[rows, idx])  # unbiased weights


def _problem(N=96, d=16, F=8, E=8, K=2, seed=0, skew=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, d)), jnp.float32)
    logits = rng.standard_normal((N, E))
    if skew:  # uneven loads, expert 7 never used
        logits[:, 0] += 2.0
        logits[:, 7] = -50
    idx = jnp.asarray(np.argsort(-logits, 1)[:, :K], jnp.int32)
    w = jnp.asarray(rng.random((N, K)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in [(E, d, F), (E, d, F), (E, F, d)]]
    return x, idx, w, ws


def _loop_reference(x, idx, w, wg, wu, wd):
    """Token by token, slot by slot: the definition."""
    x, idx, w = map(np.asarray, (x, idx, w))
    wg, wu, wd = map(np.asarray, (wg, wu, wd))
    out = np.zeros_like(x, dtype=np.float64)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            g, u = x[n] @ wg[e], x[n] @ wu[e]
            out[n] += w[n, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return out


@pytest.mark.parametrize("dispatch, tile", [("dense", 0), ("ragged", 0), ("sorted_tiles", 4),
                                            ("sorted_tiles", 16), ("sorted_tiles", 1000), ("bucket_tiles", 4),
                                            ("bucket_tiles", 128)])
def test_dispatch_values_and_gradients_equal_dense(dispatch, tile):
    x, idx, w, (wg, wu, wd) = _problem()
    ref = _loop_reference(x, idx, w, wg, wu, wd)
    out = moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, dispatch, tile)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    def loss(fn_dispatch, x, w, wg, wu, wd):
        y = moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, fn_dispatch, tile)
        return jnp.sum(jnp.sin(y))

    g = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(dispatch, x, w, wg, wu, wd)
    g_ref = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("dense", x, w, wg, wu, wd)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_dispatch_under_jit_all_tokens_one_expert():
    x, _, w, (wg, wu, wd) = _problem(N=40, K=2, skew=False)
    idx = jnp.tile(jnp.array([[3, 5]], jnp.int32), (40, 1))  # worst case for a capacity-based router
    ref = moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, "dense")
    for dispatch in ("ragged", "sorted_tiles", "bucket_tiles"):
        out = jax.jit(moe_dispatch.routed_experts, static_argnums=(6, 7))(x, idx, w, wg, wu, wd, dispatch, 8)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bucket_tiles_without_buckets():
    """Fewer routed rows than experts (a prefill of a few tokens): C = floor(N*K/E) = 0, every row goes through the
    overflow tiles; values and gradients still equal the definition and the dense dispatch."""
    x, idx, w, (wg, wu, wd) = _problem(N=3, K=2, E=8, skew=False)
    assert moe_dispatch.bucket_capacity(6, 8) == 0
    ref = _loop_reference(x, idx, w, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, "bucket_tiles", 128)),
                               ref, rtol=1e-5, atol=1e-5)

    def loss(name, x, wg, wu, wd):
        return jnp.sum(jnp.sin(moe_dispatch.routed_experts(x, idx, w, wg, wu, wd, name, 128)))

    for a, b in zip(jax.grad(loss, argnums=(1, 2, 3, 4))("bucket_tiles", x, wg, wu, wd),
                    jax.grad(loss, argnums=(1, 2, 3, 4))("dense", x, wg, wu, wd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_overflow_tiles_vjp_equals_the_definition():
    """bucket_tiles' overflow loop on its own (custom VJP: pre-activations recomputed, the rows it writes masked out
    of its input's cotangent) against autodiff of what it defines, y_nkd with the laid-out rows (n, k) replaced by
    SwiGLU_e(x_n)."""
    N, K, E = 96, 2, 8
    x, idx, _, (wg, wu, wd) = _problem(N=N, K=K, E=E)
    C = moe_dispatch.bucket_capacity(N * K, E)
    _, _, _, o_src, o_tile_e, o_used = moe_dispatch._bucket_layout(idx, E, C, 4)
    rng = np.random.default_rng(1)
    y0 = jnp.asarray(rng.standard_normal((N, K, x.shape[1])), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(y0.shape), jnp.float32)
    rows = np.asarray(o_src)[np.asarray(o_src) < N * K]
    assert int(o_used) > 0 and rows.size > 0  # expert 0 overflows its bucket

    def definition(x, wg, wu, wd, y0):
        e = np.asarray(idx).reshape(-1)[rows]
        xr = x[rows // K]
        h = jax.nn.silu(jnp.einsum("rd,rdf->rf", xr, wg[e])) * jnp.einsum("rd,rdf->rf", xr, wu[e])
        return y0.reshape(N * K, -1).at[rows].set(jnp.einsum("rf,rfd->rd", h, wd[e])).reshape(y0.shape)

    def tiles(x, wg, wu, wd, y0):
        return moe_dispatch._row_tiles_ffn(x, wg, wu, wd, y0, o_src, o_tile_e, o_used, K)

    out, vjp = jax.vjp(tiles, x, wg, wu, wd, y0)
    ref, vjp_ref = jax.vjp(definition, x, wg, wu, wd, y0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bucket_layout_and_balanced_loads():
    """bucket_tiles with every expert at exactly its capacity (no overflow tile runs) and with the skewed loads of
    _problem (overflowing experts, an empty one): the layout places each routed row once, and values and
    gradients equal the token-by-token definition."""
    N, K, E = 32, 2, 8
    assert moe_dispatch.bucket_capacity(N * K, E) == 8 and moe_dispatch.bucket_capacity(192, 8) == 24
    x, _, w, (wg, wu, wd) = _problem(N=N, K=K, E=E, skew=False)
    balanced = jnp.asarray(np.stack([np.arange(N) % E, (np.arange(N) + 1) % E], 1), jnp.int32)
    _, skewed, _, _ = _problem(N=96, K=2, E=8)
    for idx, n in ((balanced, N), (skewed, 96)):
        C = moe_dispatch.bucket_capacity(n * K, E)
        src, dest, in_bucket = map(np.asarray, moe_dispatch._bucket_layout(idx, E, C, 4)[:3])
        loads = np.bincount(np.asarray(idx).reshape(-1), minlength=E)
        np.testing.assert_array_equal(in_bucket.sum(), np.minimum(loads, C).sum())
        rows = dest[in_bucket]
        assert len(set(rows.tolist())) == rows.size  # one slot per row
        np.testing.assert_array_equal(src[rows], np.flatnonzero(in_bucket.reshape(-1)))  # src inverts dest
        np.testing.assert_array_equal(rows // C, np.asarray(idx)[in_bucket])  # each row in its expert's bucket
        assert in_bucket.all() == (n == N)  # balanced: nothing overflows; skewed: expert 0 does
    xs = x[:N]
    ref = _loop_reference(xs, balanced, w[:N], wg, wu, wd)
    out = moe_dispatch.routed_experts(xs, balanced, w[:N], wg, wu, wd, "bucket_tiles", 8)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    def loss(name, x, w, wg, wu, wd):
        return jnp.sum(jnp.sin(moe_dispatch.routed_experts(x, balanced, w, wg, wu, wd, name, 8)))

    g = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("bucket_tiles", xs, w[:N], wg, wu, wd)
    g_ref = jax.grad(loss, argnums=(1, 2, 3, 4, 5))("dense", xs, w[:N], wg, wu, wd)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_dispatch_resolves_per_backend():
    cpu = jax.default_backend() == "cpu"
    assert moe_dispatch.resolve_dispatch("auto", 128) == ("bucket_tiles" if cpu else "grouped")
    assert moe_dispatch.resolve_dispatch("auto", 512) == ("sorted_tiles" if cpu else "grouped")
    assert moe_dispatch.resolve_dispatch("sorted_tiles", 64) == "sorted_tiles"


def test_moe_module_aux_statistics():
    cfg = config.preset("tiny")
    m = moe.MoE(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.hidden_size))
    v = m.init(jax.random.PRNGKey(1), x)
    y, aux = m.apply(v, x)
    assert y.shape == x.shape
    p = jax.tree_util.tree_map(np.asarray, jax.tree_util.tree_map(lambda a: getattr(a, "value", a), v,
                                                                   is_leaf=lambda a: hasattr(a, "value")))
    s = 1 / (1 + np.exp(-(np.asarray(x).reshape(-1, cfg.hidden_size) @ p["params"]["router"]["kernel"])))
    _, idx = route_reference(s.astype(np.float32), p["router"]["router"]["bias"], cfg)
    counts = np.stack([np.bincount(idx.reshape(2, -1)[b], minlength=cfg.n_routed_experts) for b in range(2)])
    np.testing.assert_array_equal(np.asarray(aux["seq_counts"]), counts)
    np.testing.assert_array_equal(np.asarray(aux["load"]), counts.sum(0))
    probs = (s / s.sum(-1, keepdims=True)).reshape(2, 6, -1).mean(1)
    np.testing.assert_allclose(np.asarray(aux["seq_probs"]), probs, rtol=1e-5)
    # The bias lives outside "params": a trainer's optimizer never sees it.
    assert "bias" not in p["params"] and p["router"]["router"]["bias"].shape == (cfg.n_routed_experts,)
