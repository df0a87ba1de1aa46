"""train_step: gradient accumulation == one big batch, the aux-loss-free bias update (global loads, sign, gamma,
outside the optimizer), non-finite steps skipped, metrics consistent with the eval step, the loss falls.

Two compiled steps are shared by every test (shapes [2, 1, T+1] and [1, 2, T+1]); compiling is most of the time."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import config
from deepseek_jax.train import (bias_update, default_train_config, init_train_state, make_eval_step,
                                make_train_step, update_router_bias)
from deepseek_jax.train import optimizer as O
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.step import (all_finite, apply_optimizer, rederive_schedule, update_lands,
                                     validate_train_config)

TINY = config.preset("tiny", moe_dispatch="dense")  # as tests/train/conftest.py's tiny_variables
SEQ = 8
GAMMA = 0.01


def _train_cfg():
    tc = default_train_config(total_steps=200)
    tc.optim.update(dict(peak_lr=3e-3, warmup_steps=0, constant_steps=200, cosine_steps=0, final_stages=[]))
    tc.balance.gamma = GAMMA
    tc.balance.alpha = 1e-2
    return tc


@pytest.fixture(scope="module")
def setup(tiny_variables):
    tc = _train_cfg()
    state = init_train_state(TINY, tc, None, variables=tiny_variables)
    step = jax.jit(make_train_step(TINY, tc))
    eval_step = jax.jit(make_eval_step(TINY))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, SEQ + 1), 2, TINY.vocab_size)
    return state, step, eval_step, tokens


def _batch(tokens, mask=None):
    """Every call passes a mask, so all calls of a shape share one compiled step."""
    if mask is None:
        mask = jnp.ones(tokens.shape[:-1] + (tokens.shape[-1] - 1,))
    return {"tokens": tokens, "mask": mask}


def _eval_halves(eval_step, params, router, tokens):
    """The eval step on each sequence alone (one compiled shape), summed."""
    evs = [eval_step(params, router, _batch(tokens[i:i + 1])) for i in range(tokens.shape[0])]
    return evs, jax.tree_util.tree_map(lambda *x: sum(x), *evs)


@pytest.fixture(scope="module")
def micro_and_big(setup):
    """The same 2 sequences as 2 micro-batches of 1 and as 1 batch of 2."""
    state, step, _, tokens = setup
    s_micro, m_micro = step(state, _batch(tokens[:, None]))
    s_big, m_big = step(state, _batch(tokens[None]))
    return s_micro, m_micro, s_big, m_big


def _leaves(t):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]


def test_grad_accumulation_equals_big_batch(setup, micro_and_big):
    state, *_ = setup
    s_micro, m_micro, s_big, m_big = micro_and_big
    for k in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "expert_load", "max_vio_batch", "tokens"):
        np.testing.assert_allclose(m_micro[k], m_big[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Adam's first moment after one step is 0.1 * the clipped gradient: the gradients agree to fp32 rounding
    # (per tensor, relative to its largest entry: single entries that sum many terms with cancellation can differ
    # by more, relatively); the second moment is 0.05 * its square, so twice the relative rounding
    for a, b in zip(_leaves(s_micro.opt_state), _leaves(s_big.opt_state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
    moved = max(np.abs(a - b).max() for a, b in zip(_leaves(s_big.params), _leaves(state.params)))
    assert moved > 1e-3  # the step did something
    # Adam's first update is lr * g / (|g| + eps): on coordinates with |g| near eps it amplifies the fp32 rounding
    # of g (summation order differs) up to lr * err(g) / eps, so a few coordinates differ by up to ~1e-5 at this lr
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(_leaves(s_micro.params), _leaves(s_big.params))])
    assert np.mean(diffs > 1e-6) < 1e-3 and diffs.max() < 1e-4
    for a, b in zip(_leaves(s_micro.router), _leaves(s_big.router)):
        np.testing.assert_array_equal(a, b)
    assert int(s_micro.step) == 1 and int(s_micro.skipped) == 0 and float(m_micro["nonfinite"]) == 0


def test_metrics_match_eval_and_add_up(setup, micro_and_big):
    state, _, eval_step, tokens = setup
    _, m, _, _ = micro_and_big
    _, ev = _eval_halves(eval_step, state.params, state.router, tokens)
    np.testing.assert_allclose(m["ce"], ev["ce_sum"] / ev["count"], rtol=1e-6)
    np.testing.assert_allclose(m["mtp_ce"], ev["mtp_ce_sum"] / ev["mtp_count"], rtol=1e-6)
    np.testing.assert_allclose(m["mtp_loss"], 0.3 * m["mtp_ce"].mean(), rtol=1e-6)   # lambda = 0.3 at step 0
    np.testing.assert_allclose(m["loss"], m["ce"] + m["mtp_loss"] + m["balance_loss"], rtol=1e-6)
    # balance loss ~ alpha * (about 1 for near-uniform routing); exactly alpha * E/K at worst
    assert 0.5e-2 < float(m["balance_loss"]) < 1e-2 * TINY.n_routed_experts / TINY.num_experts_per_tok
    L, E = TINY.num_moe_layers, TINY.n_routed_experts
    assert m["expert_load"].shape == (L, E) and m["max_vio_layers"].shape == (L,)
    np.testing.assert_allclose(m["expert_load"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["expert_load"], ev["load"] / ev["load"].sum(-1, keepdims=True), rtol=1e-6)
    assert float(m["tokens"]) == 2 * SEQ and float(ev["count"]) == 2 * SEQ
    assert float(m["lr"]) == pytest.approx(3e-3) and float(m["gamma"]) == pytest.approx(GAMMA)
    assert float(m["grad_norm"]) > 0
    assert all(np.all(np.isfinite(v)) and np.asarray(v).dtype == np.float32 for v in m.values())


def test_bias_update_from_global_batch_loads(setup, micro_and_big):
    """The step moves each bias by exactly -gamma / 0 / +gamma, from the loads of the WHOLE batch (summed over
    micro-batches), per layer, MTP layers from their own loads; params do not enter the update."""
    state, _, eval_step, tokens = setup
    s_micro, *_ = micro_and_big
    _, ev = _eval_halves(eval_step, state.params, state.router, tokens)
    loads = {"moe": ev["load"], "mtp": ev["mtp_load"]}
    # the "router_load" tree each Router records at its own module path (layers/router.py)
    recorded = {"moe_layers": {"mlp": {"router": {"load": ev["load"]}}},
                "mtp_0": {"block": {"mlp": {"router": {"load": ev["mtp_load"][0]}}}}}
    expect = update_router_bias(state.router, recorded, GAMMA)
    for a, b in zip(_leaves(s_micro.router), _leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    old = state.router["moe_layers"]["mlp"]["router"]["bias"]
    delta = np.asarray(s_micro.router["moe_layers"]["mlp"]["router"]["bias"] - old)
    np.testing.assert_allclose(np.abs(delta[delta != 0]), GAMMA, rtol=1e-6)
    load = np.asarray(loads["moe"])
    for layer in range(load.shape[0]):
        assert delta[layer, load[layer].argmax()] == pytest.approx(-GAMMA)   # over-loaded expert goes down
        assert delta[layer, load[layer].argmin()] == pytest.approx(GAMMA)    # under-loaded goes up
    mtp_bias = lambda r: r["mtp_0"]["block"]["mlp"]["router"]["bias"]
    mtp_delta = np.asarray(mtp_bias(s_micro.router) - mtp_bias(state.router))
    np.testing.assert_allclose(mtp_delta, GAMMA * np.sign(loads["mtp"][0].mean() - loads["mtp"][0]), atol=1e-9)


def test_bias_update_rule():
    b = jnp.zeros((2, 4))
    load = jnp.array([[5.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]])  # layer 0 mean 3; layer 1 balanced
    np.testing.assert_allclose(bias_update(b, load, 0.001), [[-0.001, 0, 0, 0.001], [0, 0, 0, 0]], atol=0)
    np.testing.assert_allclose(bias_update(b + 0.5, load, 0.0), 0.5)
    # micro-batch 1 over-loads expert 0, micro-batch 2 over-loads expert 1 by as much: the global batch is
    # balanced, so nothing moves (per-micro-batch updates would have moved experts 0 and 1 both ways)
    micro = jnp.array([[[6.0, 2.0, 4.0, 4.0]], [[2.0, 6.0, 4.0, 4.0]]])
    np.testing.assert_array_equal(bias_update(b[:1], micro.sum(0), 0.001), 0.0)
    # sign is not additive: global loads (6, 3, 6, 9) give (0, +, 0, -), the sum of per-micro signs would not
    micro = jnp.array([[[5.0, 1.0, 3.0, 3.0]], [[1.0, 2.0, 3.0, 6.0]]])
    np.testing.assert_allclose(bias_update(b[:1], micro.sum(0), 1.0), [[0.0, 1.0, 0.0, -1.0]])
    # any model layout: each bias is paired with the load recorded at its own module path; a Router that did
    # not run (no recorded load) keeps its bias
    router = {"a": {"router": {"bias": b}}, "x": {"y": {"router": {"bias": b[0] + 1.0}}}}
    new = update_router_bias(router, {"a": {"router": {"load": load}}}, 0.001)
    np.testing.assert_allclose(new["a"]["router"]["bias"], [[-0.001, 0, 0, 0.001], [0, 0, 0, 0]], atol=0)
    np.testing.assert_array_equal(new["x"]["y"]["router"]["bias"], 1.0)


def test_nonfinite_step_is_skipped(setup, tiny_variables):
    state, step, _, tokens = setup
    # a NaN weight on the output head poisons the loss
    bad_params = jax.tree_util.tree_map(lambda x: x, state.params)
    bad_params["lm_head"]["kernel"] = bad_params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
    bad = state.replace(params=bad_params)
    new, m = step(bad, _batch(tokens[:, None]))
    assert float(m["nonfinite"]) == 1 and int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(_leaves(new.params), _leaves(bad.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves((new.opt_state, new.router)), _leaves((bad.opt_state, bad.router))):
        np.testing.assert_array_equal(a, b)
    # an out-of-vocabulary id under jit embeds as NaN: skipped too, and the count accumulates
    toks = tokens.at[0, 3].set(TINY.vocab_size)
    new2, m2 = step(new.replace(params=state.params), _batch(toks[:, None]))
    assert float(m2["nonfinite"]) == 1 and int(new2.skipped) == 2 and int(new2.step) == 2
    for a, b in zip(_leaves((new2.params, new2.opt_state, new2.router)),
                    _leaves((state.params, state.opt_state, state.router))):
        np.testing.assert_array_equal(a, b)
    # and a clean batch afterwards trains normally
    new3, m3 = step(new2, _batch(tokens[:, None]))
    assert float(m3["nonfinite"]) == 0 and int(new3.skipped) == 2 and np.isfinite(float(m3["loss"]))


def test_mask_excludes_targets(setup):
    """Masked targets do not count: a garbage (but valid) last target under mask 0 leaves the CE unchanged."""
    state, step, _, tokens = setup
    mask = jnp.ones((2, 1, SEQ)).at[:, :, -1].set(0)
    _, m1 = step(state, _batch(tokens[:, None], mask))
    _, m2 = step(state, _batch(tokens[:, None].at[:, :, -1].set(5), mask))
    assert float(m1["tokens"]) == 2 * (SEQ - 1)
    np.testing.assert_allclose(m1["ce"], m2["ce"], rtol=1e-6)
    np.testing.assert_allclose(m1["mtp_ce"], m2["mtp_ce"], rtol=1e-6)


def test_loss_falls_on_repeated_batch(setup):
    state, step, _, _ = setup
    pattern = jnp.tile(jnp.arange(2, 2 + 5), 4)[: SEQ + 1]
    tokens = jnp.stack([pattern, jnp.roll(pattern, 2)])[:, None]
    losses = []
    for _ in range(30):
        state, m = step(state, _batch(tokens))
        losses.append(float(m["ce"]))
    assert losses[-1] < 0.3 * losses[0], losses
    assert float(m["bias_norm"]) > 0 and int(state.step) == 30 and int(state.skipped) == 0


def test_train_config_defaults_and_validation():
    tc = default_train_config(total_steps=1480)
    o = tc.optim
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.peak_lr) == (0.9, 0.95, 1e-8, 0.1, 1.0, 2.2e-4)
    assert o.warmup_steps + o.constant_steps == 1000 and tc.mtp.lambda_switch_step == 1000
    assert tc.balance.gamma_zero_after_step == 1430 and tc.balance.alpha == 1e-4 and tc.balance.bias_update
    assert o.warmup_steps + o.constant_steps + o.cosine_steps + sum(n for n, _ in o.final_stages) == 1480
    tc.nonfinite = "ignore"
    with pytest.raises(ValueError, match="nonfinite"):
        make_train_step(TINY, tc)
    tc = default_train_config(100)
    tc.balance.gamma_zero_after_step = None  # placeholder: None means never
    tc.balance.gamma = -1.0
    with pytest.raises(ValueError, match="balance.gamma"):
        make_train_step(TINY, tc)


@pytest.mark.parametrize("field,value", [("balance.gamma", float("inf")), ("balance.gamma", float("nan")),
                                         ("optim.peak_lr", float("inf")), ("optim.cosine_end_lr", float("nan")),
                                         ("balance.alpha", float("inf")), ("mtp.lambda_", float("nan")),
                                         ("optim.final_stages", [(3, float("inf"))]),
                                         ("optim.warmup_steps", -1), ("total_steps", 0)])
def test_nonfinite_or_negative_schedule_values_are_refused(field, value):
    tc = default_train_config(100)
    head, _, last = field.rpartition(".")
    (tc[head] if head else tc)[last] = value
    with pytest.raises(ValueError, match=f"train config {field}"):
        validate_train_config(tc)


def test_router_bias_overflow_is_skipped_not_checkpointed(tiny_variables):
    """gamma = 3e38 is finite, but two bias updates overflow fp32: the guard covers the router collection, so the
    second step is skipped and the bias stays finite (it used to turn inf with skipped == 0)."""
    tc = _train_cfg()
    tc.balance.gamma = 3e38
    state = init_train_state(TINY, tc, None, variables=tiny_variables)
    step = jax.jit(make_train_step(TINY, tc))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, SEQ + 1), 2, TINY.vocab_size)
    for _ in range(3):
        state, m = step(state, _batch(tokens[:, None]))
    assert int(state.skipped) == 2 and float(m["nonfinite"]) == 1
    for leaf in _leaves((state.params, state.opt_state, state.router)):
        assert np.all(np.isfinite(leaf))


def test_warmup_is_used_as_configured_and_the_auto_rule_is_explicit():
    # an explicit warmup is never capped (it used to become 1% of the run: 20 -> 1 for the quickstart's 120 steps)
    assert default_train_config(120, 1.5e-3, warmup_steps=20).optim.warmup_steps == 20
    assert default_train_config(300, 2e-3, warmup_steps=20).optim.warmup_steps == 20
    # not set: min(2000, max(1, 1% of the run))
    assert default_train_config(120).optim.warmup_steps == 1
    assert default_train_config(1_000_000).optim.warmup_steps == 2000
    with pytest.raises(ValueError, match=r"warmup_steps must be an int in \[0, total_steps=10\]"):
        default_train_config(10, warmup_steps=20)


def test_schedule_follows_command_line_overrides():
    base = default_train_config(120, 1.5e-3, warmup_steps=20)
    tc = copy.deepcopy(base)
    tc.total_steps, tc.optim.peak_lr = 500, 3e-3
    changed = rederive_schedule(base, tc, {"total_steps", "optim.peak_lr"})
    want = default_train_config(500, 3e-3, warmup_steps=20)
    assert set(changed) == {"optim.constant_steps", "optim.cosine_steps", "optim.cosine_end_lr", "optim.final_stages",
                            "balance.gamma_zero_after_step", "mtp.lambda_switch_step"}
    assert tc.optim.to_dict() == want.optim.to_dict()
    assert (tc.balance.gamma_zero_after_step, tc.mtp.lambda_switch_step) == (483, 338) == (
        want.balance.gamma_zero_after_step, want.mtp.lambda_switch_step)
    # a derived field also set on the command line wins
    tc = copy.deepcopy(base)
    tc.total_steps, tc.optim.cosine_steps = 500, 7
    rederive_schedule(base, tc, {"total_steps", "optim.cosine_steps"})
    assert tc.optim.cosine_steps == 7 and tc.optim.constant_steps == want.optim.constant_steps
    # a hand-set schedule cannot follow: refused, naming the field
    base.optim.constant_steps = 50
    tc = copy.deepcopy(base)
    tc.total_steps = 500
    with pytest.raises(ValueError, match="train config optim.constant_steps: the config file sets it by hand"):
        rederive_schedule(base, tc, {"total_steps"})
    # nothing schedule-related overridden: untouched
    tc = copy.deepcopy(base)
    assert rederive_schedule(base, tc, {"balance.gamma"}) == [] and tc == base


def test_update_lands_decides_as_the_direct_check():
    """step.update_lands (a proof from input norms, else the update recomputed and checked) against the direct
    check of the update it guards: its norm, the new params and moments all finite. Covered: a normal step (the
    proof), eps 1e-30 (no proof, a finite update: the check path says True), lr 1e30 (per-element finite, norm
    inf: False), and a step already refused (``ok`` False: nothing to decide)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "n": {"scale": jnp.ones((8,))}}
    grads = jax.tree_util.tree_map(lambda p: 0.01 * jnp.cos(p), params)
    for kw, expect in ((dict(), True), (dict(eps=1e-30), True), (dict(peak_lr=1e30), False)):
        tc = _train_cfg()
        tc.optim.update(kw)
        opt = O.make_optimizer(tc.optim)
        state = opt.init(params)
        gn = optax.global_norm(grads)
        lr = O.schedule_from_config(tc.optim)(3)
        p, s, u = apply_optimizer(opt, grads, state, params, 3)
        direct = bool(jnp.isfinite(optax.global_norm(u)) & all_finite((p, s)))
        proved = bool(O.update_surely_finite(tc.optim, params, state, gn, lr))
        lands = jax.jit(lambda ok: update_lands(opt, tc.optim, grads, gn, state, params, 3, lr, ok))
        assert direct is expect and bool(lands(jnp.asarray(True))) is expect, kw
        assert proved is (not kw), kw  # the eps and lr cases go through the check path
        assert bool(lands(jnp.asarray(False)))  # already refused: update_lands has nothing to add


def test_guard_paths_land_the_same_state(setup, tiny_variables, monkeypatch):
    """The train step with the finiteness proof switched off (every update recomputed and checked inside the
    lax.cond branch) lands bit for bit the state of the normal step, which takes the proof."""
    state, step, _, tokens = setup
    fast, _ = step(state, _batch(tokens[:, None]))
    monkeypatch.setattr(step_lib, "update_surely_finite", lambda *a: jnp.asarray(False))
    slow_step = jax.jit(make_train_step(TINY, _train_cfg()))
    slow, m = slow_step(state, _batch(tokens[:, None]))
    assert float(m["nonfinite"]) == 0
    for a, b in zip(_leaves((fast.params, fast.opt_state, fast.router)), _leaves((slow.params, slow.opt_state,
                                                                                  slow.router))):
        np.testing.assert_array_equal(a, b)
