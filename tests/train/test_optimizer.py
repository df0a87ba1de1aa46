"""Schedules at their phase boundaries, the batch-size ramp, the weight-decay mask, clipping, bf16 moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.train import optimizer as O
from deepseek_jax.train import default_train_config

PEAK, END = 2.2e-4, 2.2e-5


def test_lr_schedule_phase_boundaries():
    f = O.lr_schedule(PEAK, warmup_steps=10, constant_steps=20, cosine_steps=40, cosine_end_lr=END,
                      final_stages=[(5, 2.2e-5), (3, 7.3e-6)])
    lr = lambda s: float(f(s))
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(PEAK / 2, rel=1e-6)
    assert lr(10) == pytest.approx(PEAK, rel=1e-6)                 # warmup end = peak
    assert lr(29) == pytest.approx(PEAK, rel=1e-6)                 # constant
    assert lr(30) == pytest.approx(PEAK, rel=1e-6)                 # cosine start
    assert lr(50) == pytest.approx((PEAK + END) / 2, rel=1e-5)     # cosine midpoint
    assert END < lr(69) < lr(50)
    assert lr(70) == pytest.approx(2.2e-5, rel=1e-6)               # stage 1
    assert lr(74) == pytest.approx(2.2e-5, rel=1e-6)
    assert lr(75) == pytest.approx(7.3e-6, rel=1e-6)               # stage 2
    assert lr(10_000) == pytest.approx(7.3e-6, rel=1e-6)           # holds after the last stage
    np.testing.assert_allclose(np.asarray(jax.jit(f)(jnp.arange(80))), [lr(s) for s in range(80)], rtol=1e-6)
    g = O.lr_schedule(PEAK, 0, 0, 10, END)  # no warmup, no stages: cosine end holds
    assert float(g(0)) == pytest.approx(PEAK) and float(g(100)) == pytest.approx(END)


def test_paper_phases():
    # paper scale: 2000 warmup steps kept; fractions 10 / 4.3 / 0.333 / 0.167 of 14.8
    total = 240_000
    ph = O.paper_lr_phases(total)
    assert ph["warmup_steps"] == 2000
    assert ph["warmup_steps"] + ph["constant_steps"] == round(total * 10 / 14.8)
    assert ph["cosine_steps"] == pytest.approx(total * 4.3 / 14.8, abs=1)
    (n1, v1), (n2, v2) = ph["final_stages"]
    assert n1 == pytest.approx(total * 0.333 / 14.8, abs=1) and v1 == pytest.approx(2.2e-5)
    assert n2 == pytest.approx(total * 0.167 / 14.8, abs=1) and v2 == pytest.approx(7.3e-6)
    assert ph["warmup_steps"] + ph["constant_steps"] + ph["cosine_steps"] + n1 + n2 == total
    # a short run: warmup scaled to 1% of it
    ph = O.paper_lr_phases(1000)
    assert ph["warmup_steps"] == 10
    f = O.paper_lr_schedule(1000)
    assert float(f(10)) == pytest.approx(PEAK)
    assert float(f(999)) == pytest.approx(7.3e-6)
    assert float(f(676 + 145)) == pytest.approx((PEAK + END) / 2, rel=1e-3)  # mid-cosine
    for total in (1, 2, 7, 50):  # degenerate totals still add up
        ph = O.paper_lr_phases(total)
        assert ph["warmup_steps"] + ph["constant_steps"] + ph["cosine_steps"] + sum(
            n for n, _ in ph["final_stages"]) == total


def test_gamma_lambda_schedules():
    total = 1480
    gam, lam = O.gamma_schedule(total), O.lambda_schedule(total)
    assert float(gam(0)) == pytest.approx(0.001) and float(gam(1429)) == pytest.approx(0.001)
    assert float(gam(1430)) == 0.0 and float(gam(1479)) == 0.0      # last 500B of 14.8T = last 50 of 1480
    assert float(lam(999)) == pytest.approx(0.3) and float(lam(1000)) == pytest.approx(0.1)  # 10T of 14.8T
    const = O.step_function(0.5, 0.0, None)
    assert float(const(10 ** 6)) == 0.5


def test_batch_size_ramp():
    bs = lambda t, **kw: O.batch_size_at(t, **kw)
    assert bs(0) == 3072 and bs(469e9) == 15360 and bs(1e13) == 15360
    assert bs(469e9 / 2) == (3072 + 15360) // 2                    # linear in tokens
    assert bs(469e9 / 3, multiple=512) % 512 == 0
    assert bs(469e9 / 3, multiple=512) <= 3072 + (15360 - 3072) / 3
    assert bs(0, start=8, end=32, ramp_tokens=100, multiple=8) == 8
    assert bs(99, start=8, end=32, ramp_tokens=100, multiple=8) == 24   # 31.76 -> floor to 24
    assert bs(100, start=8, end=32, ramp_tokens=100, multiple=8) == 32
    with pytest.raises(ValueError, match="multiple"):
        bs(0, start=10, end=32, multiple=8)


def _opt_cfg(**kw):
    c = default_train_config(100).optim
    c.update(dict(warmup_steps=0, constant_steps=100, cosine_steps=0, final_stages=[], peak_lr=0.1))
    c.update(kw)
    return c


# a params tree shaped like the model's: scanned norm gains are 2-D, kernels 3-D
PARAMS = {
    "embed": {"embedding": jnp.ones((16, 8))},
    "moe_layers": {"attn_norm": {"scale": jnp.ones((2, 8))}, "mlp": {"router": {"kernel": jnp.ones((2, 8, 4))},
                                                                      "experts_up": jnp.ones((2, 4, 8, 3))}},
    "final_norm": {"scale": jnp.ones((8,))},
    "lm_head": {"kernel": jnp.ones((8, 16))},
}


def test_decay_mask_on_model_params(tiny_variables):
    mask = O.decay_mask(tiny_variables["params"])
    for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
        name = jax.tree_util.keystr(path)
        leaf_is_norm = name.endswith("['scale']")
        assert m == (not leaf_is_norm), name
    assert mask["embed"]["embedding"] and mask["lm_head"]["kernel"]
    assert mask["moe_layers"]["mlp"]["router"]["kernel"] and mask["moe_layers"]["mlp"]["experts_gate"]
    assert not mask["moe_layers"]["attn_norm"]["scale"] and not mask["mtp_0"]["enorm"]["scale"]
    # the optimizer only ever sees params: no router bias in its state
    opt_state = jax.eval_shape(O.make_optimizer(_opt_cfg()).init, tiny_variables["params"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    assert not any("bias" in p for p in paths)
    adam = next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))
    assert jax.tree_util.tree_structure(adam.mu) == jax.tree_util.tree_structure(tiny_variables["params"])


def test_weight_decay_applied_by_mask():
    """Zero gradients: Adam's step is 0, so the update is -lr * wd * p exactly where the mask says."""
    lr, wd = 0.1, 0.1
    opt = O.make_optimizer(_opt_cfg(peak_lr=lr, weight_decay=wd))
    state = opt.init(PARAMS)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    new = jax.jit(lambda z, s, p: optax.apply_updates(p, opt.update(z, s, p, step=0)[0]))(zeros, state, PARAMS)
    np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["moe_layers"]["attn_norm"]["scale"], 1.0)
    for leaf in (new["embed"]["embedding"], new["lm_head"]["kernel"], new["moe_layers"]["mlp"]["router"]["kernel"],
                 new["moe_layers"]["mlp"]["experts_up"]):
        np.testing.assert_allclose(leaf, 1 - lr * wd, rtol=1e-6)
    with pytest.raises(ValueError, match="step"):
        jax.eval_shape(lambda: opt.update(zeros, state, PARAMS))


def test_clip_before_adam_and_adam_first_step():
    """First Adam step is lr * g / (|g| + eps) elementwise, so clipping shows up only through eps; check clipping
    with the optax pieces directly and the full chain against a hand-written AdamW step."""
    g = {"w": jnp.array([[3.0, 4.0]])}  # global norm 5
    p = {"w": jnp.array([[1.0, -1.0]])}
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.clip_by_global_norm(1.0).init(p))
    np.testing.assert_allclose(clipped["w"], [[0.6, 0.8]], rtol=1e-6)
    opt = O.make_optimizer(_opt_cfg(peak_lr=0.01, weight_decay=0.1, eps=1e-8))
    s = opt.init(p)
    upd, s = opt.update(g, s, p, step=0)
    gc = np.array([[0.6, 0.8]])
    expect = -0.01 * (gc / (np.abs(gc) + 1e-8) + 0.1 * np.array([[1.0, -1.0]]))
    np.testing.assert_allclose(upd["w"], expect, rtol=1e-6)
    # second step by hand (b1 0.9, b2 0.95) with the same clipped gradient
    upd2, _ = opt.update(g, s, p, step=1)
    m = (0.1 * gc * 0.9 + 0.1 * gc) / (1 - 0.9 ** 2)
    v = (0.05 * gc ** 2 * 0.95 + 0.05 * gc ** 2) / (1 - 0.95 ** 2)
    np.testing.assert_allclose(upd2["w"], -0.01 * (m / (np.sqrt(v) + 1e-8) + 0.1 * np.array([[1.0, -1.0]])),
                               rtol=1e-5)


def test_bf16_moments_track_fp32():
    """Both moments stored in bf16; 30 steps of noisy gradients on a quadratic track the fp32 optimizer."""
    opt32 = O.make_optimizer(_opt_cfg(peak_lr=0.01))
    opt16 = O.make_optimizer(_opt_cfg(peak_lr=0.01, bf16_moments=True))
    p0 = {"w": jnp.ones((2, 8, 4)), "norm": {"scale": jnp.ones((8,))}}

    @jax.jit
    def run(p0):
        target = jax.tree_util.tree_map(lambda x: 0.3 * x, p0)

        def body(i, carry):
            p32, s32, p16, s16 = carry
            k = jax.random.fold_in(jax.random.PRNGKey(0), i)
            grad = lambda p: jax.tree_util.tree_map(lambda a, b: a - b + 0.1 * jax.random.normal(k, a.shape),
                                                    p, target)
            u32, s32 = opt32.update(grad(p32), s32, p32, step=i)
            u16, s16 = opt16.update(grad(p16), s16, p16, step=i)
            return optax.apply_updates(p32, u32), s32, optax.apply_updates(p16, u16), s16

        p32, _, p16, s16 = jax.lax.fori_loop(0, 30, body, (p0, opt32.init(p0), p0, opt16.init(p0)))
        return p32, p16, s16

    p32, p16, s16 = run(p0)
    adam = next(s for s in s16 if isinstance(s, optax.ScaleByAdamState))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves((adam.mu, adam.nu)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p16))
    for a, b, x0 in zip(jax.tree_util.tree_leaves(p32), jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(p0)):
        moved = np.abs(np.asarray(a) - np.asarray(x0)).max()
        assert moved > 0.1
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.02 * moved)


def _moments_state(opt, params, mu, nu, count):
    """opt.init(params) with the Adam moments and count replaced."""
    return tuple(optax.ScaleByAdamState(count=jnp.asarray(count, jnp.int32), mu=mu, nu=nu)
                 if isinstance(s, optax.ScaleByAdamState) else s for s in opt.init(params))


@pytest.mark.parametrize("kw", [
    dict(), dict(peak_lr=1e3, eps=1e-3), dict(clip_norm=None), dict(bf16_moments=True, weight_decay=0.0),
    dict(b1=0.5, b2=0.999, peak_lr=1e10)])
def test_update_bounds_hold(kw):
    """optimizer.update_bounds (norms of the inputs only) bounds the real update's norm and the real v_hat, checked
    in float64 on the update make_optimizer computes, over states of very different scales: moments of any size
    (not only Adam's own history), a first step (bias correction at its largest) and later ones."""
    cfg = _opt_cfg(**kw)
    opt = O.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    b2 = float(cfg.b2)
    for trial in range(12):
        scale = lambda: 10.0 ** rng.uniform(-6, 3)
        params = {"w": jnp.asarray(rng.normal(size=(6, 5)) * scale(), jnp.float32),
                  "norm": {"scale": jnp.asarray(rng.normal(size=(5,)) * scale(), jnp.float32)}}
        draw = lambda s: jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape) * s, jnp.float32),
                                                params)
        grads = draw(scale())
        count = int(rng.integers(0, 50))
        nu = jax.tree_util.tree_map(jnp.abs, draw(scale()))
        state = _moments_state(opt, params, draw(scale()), nu, count)
        grad_norm = optax.global_norm(grads)
        lr = O.schedule_from_config(cfg)(count)
        upd, new_state = opt.update(grads, state, params, step=count)
        bound_u, bound_v, bound_p = (float(b) for b in O.update_bounds(cfg, params, state, grad_norm, lr))
        norm_u = np.sqrt(sum(np.sum(np.asarray(u, np.float64) ** 2) for u in jax.tree_util.tree_leaves(upd)))
        nu_new = O.adam_moments(new_state)[1]
        v_max = max(np.max(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(nu_new))
        v_hat = v_max / (1 - b2 ** (count + 1))
        assert np.isfinite(norm_u) and norm_u <= bound_u * (1 + 1e-5), (trial, norm_u, bound_u)
        assert v_hat <= bound_v * (1 + 1e-5), (trial, v_hat, bound_v)
        p_max = max(np.max(np.abs(np.asarray(x, np.float64)))
                    for x in jax.tree_util.tree_leaves(optax.apply_updates(params, upd)))
        assert p_max <= bound_p * (1 + 1e-5), (trial, p_max, bound_p)
    # where the bound is tight: the first update, zero gradient, second moment and params, so every element of the
    # update is -lr * m_hat / eps with m_hat = b1 m / (1 - b1): a bound too small by any factor fails here
    params = {"w": jnp.zeros((3, 4)), "norm": {"scale": jnp.zeros((4,))}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    mu = {"w": jnp.full((3, 4), 1e-3), "norm": {"scale": jnp.full((4,), -2e-3)}}
    state = _moments_state(opt, params, mu, zeros, 0)
    lr = O.schedule_from_config(cfg)(0)
    upd, _ = opt.update(zeros, state, params, step=0)
    norm_u = np.sqrt(sum(np.sum(np.asarray(u, np.float64) ** 2) for u in jax.tree_util.tree_leaves(upd)))
    bound_u = float(O.update_bounds(cfg, params, state, jnp.float32(0.0), lr)[0])
    assert bound_u * (1 - 1e-4) <= norm_u <= bound_u * (1 + 1e-5), (norm_u, bound_u)


def test_update_surely_finite_is_false_where_it_cannot_prove():
    """The proof needs eps > 0 and a moderate lr; without them it answers False (the caller then checks the update
    itself), never True."""
    params = {"w": jnp.ones((4, 4))}
    g = {"w": jnp.full((4, 4), 0.1)}
    for kw, expect in ((dict(), True), (dict(eps=0.0), False), (dict(peak_lr=1e30), False),
                       (dict(b2=1.0), False)):
        cfg = _opt_cfg(**kw)
        opt = O.make_optimizer(cfg)
        state = opt.init(params)
        got = O.update_surely_finite(cfg, params, state, optax.global_norm(g), O.schedule_from_config(cfg)(0))
        assert bool(got) is expect, kw
    cfg = _opt_cfg()
    state = O.make_optimizer(cfg).init(params)
    huge = {"w": jnp.full((4, 4), 1e35)}
    assert not bool(O.update_surely_finite(cfg, huge, state, optax.global_norm(g), 0.1))
    assert not bool(O.update_surely_finite(cfg, params, state, jnp.float32(jnp.inf), 0.1))


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_guarded_step_is_where_of_the_optax_step(bf16_moments):
    """guarded_step (the moments selected first, the update computed again from them) against optax's own step
    under where(ok, new, old): the optimizer state bit for bit, the parameters to 2 ulp (bit for bit on jax 0.10
    and 0.11; jax 0.12.1's XLA rounds one element of the two programs' parameter updates 1 ulp apart): over 4
    steps (Adam's bias correction changes with the count), with the gradient clipped on some steps and not others,
    a decayed matrix and an undecayed norm gain, and a refused step (ok False) in the middle, which must leave
    params and state (its count included) as they were."""
    tc = default_train_config(total_steps=10)
    tc.optim.update(dict(peak_lr=3e-2, warmup_steps=2, constant_steps=8, cosine_steps=0, final_stages=[],
                         bf16_moments=bf16_moments))
    opt = O.make_optimizer(tc.optim)
    params = {"w": jnp.linspace(-1.0, 1.0, 48).reshape(6, 8), "n": {"scale": jnp.linspace(0.5, 1.5, 8)}}
    state = opt.init(params)
    ref_p, ref_s = params, state
    where = lambda ok, a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(ok, x, y), a, b)

    @jax.jit
    def ref_step(p, s, g, step, ok):
        u, s2 = opt.update(g, s, p, step=step)
        return where(ok, optax.apply_updates(p, u), p), where(ok, s2, s)

    lr = O.schedule_from_config(tc.optim)
    guarded = jax.jit(lambda p, s, g, step, ok: O.guarded_step(opt, tc.optim, g, s, p, step, lr(step), ok))
    for step, (scale, ok) in enumerate([(0.01, True), (5.0, True), (3.0, False), (0.02, True), (4.0, True)]):
        step += 1  # lr(0) = 0 in the warmup
        g = jax.tree_util.tree_map(lambda p: scale * jnp.sin(3.0 * p + step), params)
        ref_p, ref_s = ref_step(ref_p, ref_s, g, step, jnp.asarray(ok))
        before = (params, state)
        params, state = guarded(params, state, g, step, jnp.asarray(ok))
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_s)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_p)):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
        changed = [bool(jnp.any(a != b)) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                           jax.tree_util.tree_leaves((params, state)))]
        assert all(changed) if ok else not any(changed), (step, changed)
