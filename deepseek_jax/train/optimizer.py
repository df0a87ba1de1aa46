"""AdamW and the paper's schedules (V3 §4.2; docs/paper_numbers.md "Pre-training recipe").

Optimizer (``make_optimizer``), in this order on the fp32 gradient of the global batch:
  1. clip to global norm ``clip_norm`` (1.0), BEFORE Adam, as torch's clip_grad_norm_ + AdamW;
  2. Adam moments with b1 = 0.9, b2 = 0.95, eps = 1e-8 (the paper does not state eps; 1e-8 is the optax/torch
     default and Megatron's); with ``bf16_moments`` both moments are STORED in bf16 (V3 §3.3: "AdamW moments
     BF16") while the update itself is computed in fp32 (``scale_by_adam_bf16``);
  3. decoupled weight decay 0.1 (update += wd * param, later multiplied by the learning rate, as torch's AdamW),
     applied through ``decay_mask``: every matrix is decayed (attention and FFN kernels, routed and shared experts,
     the router kernel, MTP's eh_proj, the embedding table and the output head), while RMSNorm gains
     (parameters named ``scale``) and any other 1-D parameter are not. Norm gains multiply a normalised vector:
     decaying them towards 0 only fights the loss without regularising anything (GPT-3/Megatron practice, which
     DeepSeek's stack descends from); the paper does not say, so this is our choice. Scanned stacks carry a
     leading "layers" axis, so norm gains are 2-D there: the mask goes by name first, then by rank.
     The router bias is not a parameter at all (its own "router" collection), so it never meets the optimizer;
  4. times -lr(step), with ``step`` passed explicitly to ``update`` (``opt.update(g, s, p, step=state.step)``):
     one clock, the train state's step (batches consumed), drives the learning rate, lambda and gamma alike.
     Adam's bias correction keeps its own count of updates actually made.

Schedules are pure functions of the step (``lr_schedule``) or of tokens seen (``batch_size_at``), and the
``paper_*`` helpers map the paper's token fractions of its 14.8T-token run onto a run of ``total_steps`` steps,
assuming a constant number of tokens per step (the batch ramp covers only 469B/14.8T = 3.2% of the paper's
tokens, so this is close; a loop that ramps the batch may prefer to drive the clock by tokens).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

# The paper's run, in tokens (V3 §4.2): constant LR to 10T, cosine over 4.3T, 333B at 2.2e-5, last 167B at 7.3e-6.
PAPER_TOTAL_TOKENS = 14.8e12
PAPER_CONSTANT_END_TOKENS = 10.0e12      # end of the constant phase (warmup included)
PAPER_COSINE_TOKENS = 4.3e12
PAPER_STAGE1_TOKENS = 333e9
PAPER_PEAK_LR = 2.2e-4
PAPER_COSINE_END_LR = 2.2e-5             # = 0.1 * peak
PAPER_FINAL_LR = 7.3e-6
PAPER_WARMUP_STEPS = 2000
PAPER_GAMMA_ZERO_TOKENS = 14.3e12        # gamma = 0.001 up to here, 0 for the last 500B
PAPER_LAMBDA_SWITCH_TOKENS = 10.0e12     # MTP lambda 0.3 up to here, 0.1 after
# The warmup a config gets when it does not set one (``warmup_steps=None``): the paper's 2000 steps, or this
# fraction of a shorter run. The paper's 2000 steps are ~0.8% (calc) of its ~240K steps (469B tokens at a mean
# batch of 9216 x 4K, then 14.33T at 15360 x 4K); 1% is this project's choice. A warmup that IS set is used as
# given, never capped.
AUTO_WARMUP_FRACTION = 0.01


# ---------------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------------
def lr_schedule(peak_lr: float, warmup_steps: int, constant_steps: int, cosine_steps: int, cosine_end_lr: float,
                final_stages: Sequence[Tuple[int, float]] = ()) -> Schedule:
    """lr(step), jittable. Phases, with boundaries b1 = W, b2 = W + C, b3 = W + C + Cs:

      [0, b1)    linear warmup  peak * step / W   (0 at step 0, peak at step W; W = 0 skips the phase)
      [b1, b2)   constant peak
      [b2, b3)   cosine  end + (peak - end) * (1 + cos(pi * (step - b2) / Cs)) / 2   (midpoint = (peak + end) / 2)
      [b3, ...)  the constant stages [(n_steps, value), ...] in order; after the last one its value holds
                 (with no stages, ``cosine_end_lr`` holds).
    """
    for name, v in (("warmup_steps", warmup_steps), ("constant_steps", constant_steps),
                    ("cosine_steps", cosine_steps)):
        if int(v) != v or v < 0:
            raise ValueError(f"lr_schedule: {name} must be a non-negative int, got {v!r}")
    stages = [(int(n), float(v)) for n, v in final_stages]
    if any(n < 0 for n, _ in stages):
        raise ValueError(f"lr_schedule: final_stages lengths must be >= 0, got {final_stages!r}")
    peak, end = float(peak_lr), float(cosine_end_lr)
    W, C, Cs = int(warmup_steps), int(constant_steps), int(cosine_steps)
    b2, b3 = W + C, W + C + Cs

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * s / max(W, 1)
        frac = jnp.clip((s - b2) / max(Cs, 1), 0.0, 1.0)
        cos = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        lr = jnp.where(s < W, warm, jnp.where(s < b2, peak, cos))
        start = b3
        for n, v in stages:
            lr = jnp.where(s >= start, v, lr)
            start += n
        return lr.astype(jnp.float32)

    return schedule


def auto_warmup_steps(total_steps: int) -> int:
    """The warmup of a config that sets none: min(2000, max(1, round(1% of total_steps))), the paper's 2000 steps
    at paper scale, scaled down for short runs (2000 warmup steps would swallow a 3000-step ablation)."""
    return min(PAPER_WARMUP_STEPS, max(1, round(AUTO_WARMUP_FRACTION * int(total_steps))))


def paper_lr_phases(total_steps: int, peak_lr: float = PAPER_PEAK_LR, warmup_steps: Optional[int] = None,
                    cosine_end_lr: Optional[float] = None, final_lr: Optional[float] = None) -> dict:
    """The paper's LR phases mapped onto ``total_steps`` (fractions of 14.8T tokens = fractions of steps).

    warmup   ``warmup_steps`` exactly as given (0 <= warmup_steps <= total_steps, else ValueError); None:
             ``auto_warmup_steps(total_steps)``
    constant up to round(total * 10/14.8) steps (warmup included, as in the paper: "constant until 10T")
    cosine   round(total * 4.3/14.8) steps, peak -> cosine_end_lr (default 0.1 * peak: 2.2e-4 -> 2.2e-5)
    stages   round(total * 0.333/14.8) steps at cosine_end_lr, then the rest at final_lr (default
             peak * 7.3e-6/2.2e-4); the lengths add up to total_steps exactly.
    Returns the keyword arguments of ``lr_schedule``.
    """
    total = int(total_steps)
    if total < 1:
        raise ValueError(f"paper_lr_phases: total_steps must be >= 1, got {total_steps!r}")
    peak = float(peak_lr)
    end = PAPER_COSINE_END_LR / PAPER_PEAK_LR * peak if cosine_end_lr is None else float(cosine_end_lr)
    final = PAPER_FINAL_LR / PAPER_PEAK_LR * peak if final_lr is None else float(final_lr)
    frac = lambda tokens: tokens / PAPER_TOTAL_TOKENS
    if warmup_steps is None:
        warm = auto_warmup_steps(total)
    else:
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total:
            raise ValueError(f"paper_lr_phases: warmup_steps must be an int in [0, total_steps={total}], got "
                             f"{warmup_steps!r}")
        warm = int(warmup_steps)
    const_end = max(warm, round(total * frac(PAPER_CONSTANT_END_TOKENS)))
    cos_end = min(total, max(const_end, round(total * frac(PAPER_CONSTANT_END_TOKENS + PAPER_COSINE_TOKENS))))
    s1_end = min(total, max(cos_end, round(total * frac(PAPER_CONSTANT_END_TOKENS + PAPER_COSINE_TOKENS
                                                       + PAPER_STAGE1_TOKENS))))
    return {"peak_lr": peak, "warmup_steps": warm, "constant_steps": const_end - warm,
            "cosine_steps": cos_end - const_end, "cosine_end_lr": end,
            "final_stages": [(s1_end - cos_end, end), (max(0, total - s1_end), final)]}


def paper_lr_schedule(total_steps: int, peak: float = PAPER_PEAK_LR,
                      warmup_steps: Optional[int] = None) -> Schedule:
    """``lr_schedule`` with the paper's phases on ``total_steps`` (see ``paper_lr_phases``)."""
    return lr_schedule(**paper_lr_phases(total_steps, peak, warmup_steps))


def schedule_from_config(opt_cfg) -> Schedule:
    """lr(step) from a train config's ``optim`` block (peak_lr, warmup_steps, constant_steps, cosine_steps,
    cosine_end_lr, final_stages)."""
    return lr_schedule(opt_cfg.peak_lr, opt_cfg.warmup_steps, opt_cfg.constant_steps, opt_cfg.cosine_steps,
                       opt_cfg.cosine_end_lr, [tuple(s) for s in opt_cfg.final_stages])


# ---------------------------------------------------------------------------------------------------------------
# gamma (bias update speed) and MTP lambda: step functions
# ---------------------------------------------------------------------------------------------------------------
def step_function(before: float, after: float, switch_step: Optional[int]) -> Schedule:
    """value(step) = before for step < switch_step, after from switch_step on (before forever if None)."""
    before, after = float(before), float(after)
    if switch_step is None:
        return lambda step: jnp.asarray(before, jnp.float32)
    return lambda step: jnp.where(jnp.asarray(step) < switch_step, before, after).astype(jnp.float32)


def paper_gamma_switch_step(total_steps: int) -> int:
    """First step with gamma = 0: the last 500B of 14.8T tokens (V3 §4.2) -> round(total * 14.3/14.8)."""
    return round(int(total_steps) * PAPER_GAMMA_ZERO_TOKENS / PAPER_TOTAL_TOKENS)


def paper_lambda_switch_step(total_steps: int) -> int:
    """First step with MTP lambda = 0.1: after the first 10T of 14.8T tokens -> round(total * 10/14.8)."""
    return round(int(total_steps) * PAPER_LAMBDA_SWITCH_TOKENS / PAPER_TOTAL_TOKENS)


def gamma_schedule(total_steps: int, gamma: float = 0.001) -> Schedule:
    return step_function(gamma, 0.0, paper_gamma_switch_step(total_steps))


def lambda_schedule(total_steps: int, lambda_: float = 0.3, lambda_after: float = 0.1) -> Schedule:
    return step_function(lambda_, lambda_after, paper_lambda_switch_step(total_steps))


# ---------------------------------------------------------------------------------------------------------------
# Batch-size ramp
# ---------------------------------------------------------------------------------------------------------------
def batch_size_at(tokens_seen: float, start: int = 3072, end: int = 15360, ramp_tokens: float = 469e9,
                  multiple: int = 1) -> int:
    """Global batch size (sequences) after ``tokens_seen`` training tokens (V3 §4.2: 3072 -> 15360 over the first
    469B tokens). The paper does not give the ramp's shape; ours is linear in tokens seen,
    start + (end - start) * min(1, tokens_seen / ramp_tokens), rounded DOWN to a multiple of ``multiple`` (the
    micro-batch times the data-parallel size, so every step is a whole number of micro-batches). ``start`` and
    ``end`` must themselves be multiples, so both endpoints are exact. Host-side Python (a batch size is a
    static shape): each distinct value is a new compiled step, so pick ``multiple`` with that in mind.
    """
    start, end, multiple = int(start), int(end), int(multiple)
    if multiple < 1 or start < 1 or end < 1:
        raise ValueError(f"batch_size_at: start, end and multiple must be positive, got {start}, {end}, {multiple}")
    if start % multiple or end % multiple:
        raise ValueError(f"batch_size_at: start={start} and end={end} must be multiples of multiple={multiple}")
    frac = 1.0 if ramp_tokens <= 0 else min(1.0, max(0.0, float(tokens_seen) / float(ramp_tokens)))
    bs = start + (end - start) * frac
    return max(multiple, int(math.floor(bs / multiple + 1e-9)) * multiple)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------
def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params) -> Any:
    """True where weight decay applies: every parameter except RMSNorm gains (named ``scale``, 1-D per layer,
    2-D in scanned stacks) and other 1-D parameters."""
    def decide(path, leaf):
        return not (_key_name(path[-1]) == "scale" or jnp.ndim(leaf) <= 1)
    return jax.tree_util.tree_map_with_path(decide, params)


def scale_by_adam_bf16(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                       moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam's direction with both moments STORED in ``moment_dtype`` (V3 §3.3: BF16) and computed in fp32:
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2 (fp32, from the stored moments), update = m_hat / (sqrt(v_hat)
    + eps) with bias correction, then m, v rounded to bf16 for storage. (optax's ``mu_dtype`` covers m only.)
    bf16 keeps fp32's exponent range, so small v do not underflow; its 8-bit significand is ample for b2 = 0.95
    (each step moves v by 5% of the gap), less so for b2 near 1."""
    md = jnp.dtype(moment_dtype)

    def init(params):
        z = lambda p: jnp.zeros(jnp.shape(p), md)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree_util.tree_map(z, params),
                                      nu=jax.tree_util.tree_map(z, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        c = count.astype(jnp.float32)
        bc1, bc2 = 1.0 - b1 ** c, 1.0 - b2 ** c
        f32 = jnp.float32
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)),
                                    state.nu, updates)
        out = jax.tree_util.tree_map(lambda m, v, g: ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(g.dtype),
                                     mu, nu, updates)
        cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(md), t)
        return out, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)


def scale_by_lr_at_step(schedule: Schedule) -> optax.GradientTransformationExtraArgs:
    """updates * -schedule(step), with ``step`` an explicit keyword of ``update`` (no hidden counter)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, step=None, **extra):
        del params, extra
        if step is None:
            raise ValueError("this optimizer needs the step: opt.update(grads, opt_state, params, step=step)")
        lr = schedule(step)
        return jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(opt_cfg, schedule: Optional[Schedule] = None) -> optax.GradientTransformationExtraArgs:
    """clip(global norm) -> Adam (fp32 or bf16 moments) -> decoupled weight decay (masked) -> * -lr(step).

    ``opt_cfg``: a train config's ``optim`` block (b1, b2, eps, weight_decay, clip_norm, bf16_moments and the LR
    phase fields); ``schedule`` defaults to ``schedule_from_config(opt_cfg)``. Call ``update`` with ``step=``.
    """
    schedule = schedule or schedule_from_config(opt_cfg)
    parts = []
    if opt_cfg.clip_norm is not None and opt_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt_cfg.clip_norm)))
    if opt_cfg.bf16_moments:
        parts.append(scale_by_adam_bf16(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps))
    else:
        parts.append(optax.scale_by_adam(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps))
    if opt_cfg.weight_decay:
        parts.append(optax.add_decayed_weights(float(opt_cfg.weight_decay), mask=decay_mask))
    parts.append(scale_by_lr_at_step(schedule))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------------------
# One guarded step, in place
# ---------------------------------------------------------------------------------------------------------------
def _adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByAdamState in the optimizer state, found {len(found)}")
    return found[0]


def adamw_update_from_moments(opt_cfg, adam_state: optax.ScaleByAdamState, params, lr) -> Any:
    """The update ``make_optimizer(opt_cfg)`` makes, -lr (m_hat / (sqrt(v_hat) + eps) + wd p), computed from the
    moments (and count) it has just stored: the same operations as optax's ``scale_by_adam`` (fp32 moments),
    ``add_decayed_weights`` under ``decay_mask`` and ``scale_by_lr_at_step``, so the same bits."""
    b1, b2, eps, wd = (opt_cfg[k] for k in ("b1", "b2", "eps", "weight_decay"))
    c = adam_state.count
    bc1, bc2 = 1 - b1 ** c, 1 - b2 ** c
    mask = decay_mask(params)

    def leaf(m, v, p, decay):
        u = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype) + 0.0) + eps)  # + eps_root 0.0, as optax
        if wd and decay:
            u = u + float(wd) * p
        return (-lr * u).astype(u.dtype)
    return jax.tree_util.tree_map(leaf, adam_state.mu, adam_state.nu, params, mask)


def tree_where(ok, new, old):
    """where(ok, new, old) leaf by leaf (``ok`` a scalar bool)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def guarded_step(opt, opt_cfg, grads, opt_state, params, step, lr, ok) -> Tuple[Any, Any]:
    """(params, opt_state) after one step of ``opt = make_optimizer(opt_cfg)`` where ``ok``, unchanged elsewhere:
    bitwise ``where(ok, opt.update ... apply_updates, old)``, arranged so that XLA reads and writes every parameter
    and moment once, in place. The moments are selected first; the parameters' update is then computed from the
    SELECTED moments (equal to the new ones wherever ``ok``), so no buffer of the new moments must outlive the
    old ones. With bf16 moments the update is computed from the fp32 moments before their rounding, so there it
    is the direct where(ok, new, old). ``lr``: the learning rate ``opt``'s schedule gives at ``step`` (the train
    step has it already, as for ``update_bounds``)."""
    updates, new_state = opt.update(grads, opt_state, params, step=step)
    state_out = tree_where(ok, new_state, opt_state)
    if not opt_cfg.bf16_moments:
        updates = adamw_update_from_moments(opt_cfg, _adam_state(state_out), params, lr)
    return tree_where(ok, optax.apply_updates(params, updates), params), state_out


# ---------------------------------------------------------------------------------------------------------------
# A cheap proof that an update is finite (the train step's non-finite guard, BUILD.md "CPU speed")
# ---------------------------------------------------------------------------------------------------------------
UPDATE_NORM_LIMIT = 1e18   # ||update|| below this: its squared norm (<= 1e36) and p + update stay finite in fp32
STATE_NORM_LIMIT = 1e30    # the new parameters' and the second moment's bounds below this


def adam_moments(opt_state) -> Tuple[Any, Any]:
    """(mu, nu) of the Adam state inside a ``make_optimizer`` state."""
    adam = _adam_state(opt_state)
    return adam.mu, adam.nu


def _norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))


def update_bounds(opt_cfg, params, opt_state, grad_norm, lr) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Upper bounds on what ``make_optimizer(opt_cfg)`` will produce from this state, from norms of its inputs
    alone (no pass over the update itself): (bound on ||update||, bound on every element of v_hat, bound on every
    element of the new parameters).

    With g_c the clipped gradient, ||g_c|| <= g := min(grad_norm, clip_norm) (grad_norm without clipping), and
    t >= 1 updates made:
      ||m'|| <= b1 ||m|| + (1 - b1) g                      m' = b1 m + (1 - b1) g_c
      ||m_hat'|| <= ||m'|| / (1 - b1)                     bias correction 1 - b1^t >= 1 - b1
      |m_hat'_i / (sqrt(v_hat'_i) + eps)| <= |m_hat'_i| / eps
      ||update|| <= |lr| (||m_hat'|| / eps + wd ||p||)     decoupled decay on (at most) every parameter
      v_hat'_i <= (||v|| + g^2) / (1 - b2)                 v' = b2 v + (1 - b2) g_c^2, then bias correction
      |p'_i| <= ||p|| + ||update||                        p' = p + update
    A zero eps, b1 = 1 or b2 = 1 gives an infinite (or NaN) bound, which no limit accepts."""
    mu, nu = adam_moments(opt_state)
    f32 = jnp.float32
    g = grad_norm.astype(f32)
    if opt_cfg.clip_norm is not None and opt_cfg.clip_norm > 0:
        g = jnp.minimum(g, f32(opt_cfg.clip_norm))
    b1, b2, eps, wd = (f32(opt_cfg[k]) for k in ("b1", "b2", "eps", "weight_decay"))
    p_norm = _norm(params)
    m_hat = (b1 * _norm(mu) + (1 - b1) * g) / (1 - b1)
    update = jnp.abs(jnp.asarray(lr, f32)) * (m_hat / eps + wd * p_norm)
    v_hat = (_norm(nu) + g * g) / (1 - b2)
    return update, v_hat, p_norm + update


def update_surely_finite(opt_cfg, params, opt_state, grad_norm, lr) -> jax.Array:
    """True only if the update, its squared norm, the new parameters and the new moments are all finite, as
    ``update_bounds`` proves when its bounds sit far below fp32's overflow (3.4e38): ||update|| <= 1e18, v_hat and
    the new parameters <= 1e30, a margin of more than 10x against the rounding of the few fp32 operations between
    them. False says nothing: the caller must then check the update itself."""
    update, v_hat, new_params = update_bounds(opt_cfg, params, opt_state, grad_norm, lr)
    return ((update <= UPDATE_NORM_LIMIT) & (v_hat <= STATE_NORM_LIMIT) & (new_params <= STATE_NORM_LIMIT)
            & jnp.isfinite(grad_norm))
