"""One training step as a pure function: ``train_step(state, batch) -> (state, metrics)``, and the eval step.

Loss (V3 §2.1.2, §2.2):  L = CE + L_MTP + L_Bal, with
  CE     mean next-token cross-entropy over the valid targets of the global batch,
  L_MTP  (lambda / D) * sum_k CE_k                        (eq. 25; lambda from its schedule at ``state.step``)
  L_Bal  alpha * mean over MoE layers (main and MTP) and sequences of sum_i f_i P_i    (eqs. 17-20)

Gradient accumulation: ``batch["tokens"]`` is [n_micro, b, T+1] (or [B, T+1] = one micro-batch); a ``lax.scan``
runs forward+backward per micro-batch and sums fp32 gradients. Every micro-batch's loss is normalised by the token
count (and sequence count) of the WHOLE global batch, so n micro-batches of b are the same step as one batch of
n*b, up to summation order.

Aux-loss-free balancing (V3 §2.1.2; docs/paper_numbers.md "Router and balancing"): after the optimizer step, every
MoE layer's bias moves
by b_i += gamma * sign(mean_j load_j - load_i), with load the number of routed tokens per expert over the whole
global batch (summed over micro-batches), per layer; the MTP modules' MoE layers have their own biases, updated from
their own loads. The bias lives in the "router" collection, is never seen by the optimizer (no decay, no moments)
and only steers expert selection (the model uses it for top-k, never for the gate weights).

Non-finite loss, gradient or update: the step is skipped — params, opt_state and router stay as they were —
``state.skipped`` counts it, ``metrics["nonfinite"]`` is 1, and ``state.step`` still advances (it counts batches
consumed, so schedules stay aligned with the data and a resumed run replays the same sequence). Whether to go on
or stop is the loop's decision (``train_cfg.nonfinite``: "skip" | "stop"); the step itself never applies a
non-finite update either way. Whether the update is finite is decided before it is applied (``update_lands``),
so that the parameters and moments can be updated in place.

No RNG in the state: DeepSeek-V3 trains without dropout, so the step is deterministic given (state, batch).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax
import jax
from flax import traverse_util
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.router import LOAD_COLLECTION
from deepseek_jax.train import losses
from deepseek_jax.train.optimizer import (PAPER_PEAK_LR, guarded_step, make_optimizer, paper_gamma_switch_step,
                                          paper_lambda_switch_step, paper_lr_phases, schedule_from_config,
                                          step_function, tree_where, update_surely_finite)

NONFINITE_POLICIES = ("skip", "stop")
# balance.scope (optional field, default "sequence"): which balance loss alpha weights. "batch" is the batch-wise
# variant of V3 §4.5.3 (losses.batch_balance_terms), over each micro-batch, averaged over micro-batches.
BALANCE_SCOPES = ("sequence", "batch")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def paper_schedule_fields(total_steps: int, peak_lr: float = PAPER_PEAK_LR,
                          warmup_steps: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """The step-valued fields of the paper's recipe for a run of ``total_steps`` steps (token fractions of 14.8T ->
    step fractions): {"optim": LR phases, "balance": {gamma_zero_after_step}, "mtp": {lambda_switch_step}}."""
    ph = paper_lr_phases(total_steps, peak_lr, warmup_steps)
    return {"optim": ph, "balance": {"gamma_zero_after_step": paper_gamma_switch_step(total_steps)},
            "mtp": {"lambda_switch_step": paper_lambda_switch_step(total_steps)}}


# The fields paper_schedule_fields derives, and the values they are derived from (dotted, under ``train``).
SCHEDULE_INPUTS = ("total_steps", "optim.peak_lr", "optim.warmup_steps")
SCHEDULE_DERIVED = ("optim.constant_steps", "optim.cosine_steps", "optim.cosine_end_lr", "optim.final_stages",
                    "balance.gamma_zero_after_step", "mtp.lambda_switch_step")


def _get(tc, dotted):
    node = tc
    for p in dotted.split("."):
        node = node[p]
    return node


def _derived_values(total_steps, peak_lr, warmup_steps) -> Dict[str, Any]:
    f = paper_schedule_fields(total_steps, peak_lr, warmup_steps)
    flat = {f"optim.{k}": v for k, v in f["optim"].items() if k not in ("peak_lr", "warmup_steps")}
    flat["optim.final_stages"] = [tuple(st) for st in flat["optim.final_stages"]]
    flat["balance.gamma_zero_after_step"] = f["balance"]["gamma_zero_after_step"]
    flat["mtp.lambda_switch_step"] = f["mtp"]["lambda_switch_step"]
    return flat


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12))


def rederive_schedule(base, tc, overridden) -> list:
    """Make the derived schedule fields of ``tc`` (a train config after command-line overrides) follow the
    values in force. ``base``: the same config before the overrides; ``overridden``: the dotted fields (relative
    to ``train``) the command line set.

    When total_steps, optim.peak_lr or optim.warmup_steps was overridden, every derived field (SCHEDULE_DERIVED)
    that the command line did not set itself is recomputed with ``paper_schedule_fields`` from the values in
    force, provided the base config had it at the paper mapping of its own values. A derived field the config
    file set by hand (e.g. a multi-step schedule) cannot follow: ValueError naming it, so the run does not train
    on a schedule built for another length. A None switch step (never) stays None. Returns the fields changed."""
    overridden = set(overridden)
    if not overridden & set(SCHEDULE_INPUTS):
        return []
    was = _derived_values(*(_get(base, k) for k in SCHEDULE_INPUTS))
    now = _derived_values(*(_get(tc, k) for k in SCHEDULE_INPUTS))
    changed = []
    for key in SCHEDULE_DERIVED:
        if key in overridden or _get(base, key) is None:
            continue
        if not _same(_get(base, key), was[key]):
            given = ", ".join(sorted(overridden & set(SCHEDULE_INPUTS)))
            raise ValueError(f"train config {key}: the config file sets it by hand ({_get(base, key)!r}), so it "
                             f"cannot follow the command line's {given}; set --config.train.{key} too")
        head, last = key.rsplit(".", 1)
        _get(tc, head)[last] = now[key]
        changed.append(key)
    return changed


def default_train_config(total_steps: int = 1000, peak_lr: float = PAPER_PEAK_LR,
                         warmup_steps: Optional[int] = None) -> ml_collections.ConfigDict:
    """The paper's pre-training recipe (V3 §4.2) mapped onto ``total_steps`` steps.

    total_steps                 int
    nonfinite                   "skip" (count and go on) | "stop" (the loop stops); the step skips either way
    optim.peak_lr               2.2e-4
    optim.warmup_steps          as given; None: min(2000, max(1, 1% of total_steps)) (optimizer.auto_warmup_steps);
                                lr = peak * step / warmup_steps. Never capped: a warmup longer than the run is refused
    optim.constant_steps        constant peak up to 10/14.8 of the run (warmup included)
    optim.cosine_steps          4.3/14.8 of the run, cosine peak -> cosine_end_lr
    optim.cosine_end_lr         2.2e-5 (0.1 * peak)
    optim.final_stages          [(n, 2.2e-5), (rest, 7.3e-6)]: 0.333/14.8 of the run, then the last 0.167/14.8
    optim.b1, b2, eps           0.9, 0.95, 1e-8 (eps not stated in the paper)
    optim.weight_decay          0.1 (not on norm gains / 1-D params: optimizer.decay_mask)
    optim.clip_norm             1.0 (global norm, before Adam; 0 or None disables)
    optim.bf16_moments          False (True: both Adam moments stored in bf16, as the paper)
    balance.gamma               0.001 (bias update speed)
    balance.gamma_zero_after_step  first step with gamma = 0: 14.3/14.8 of the run (None: never)
    balance.alpha               1e-4 (sequence-wise balance loss weight; 0 disables the term)
    balance.bias_update         True (aux-loss-free bias update; False freezes the bias)
    mtp.lambda_                 0.3
    mtp.lambda_after            0.1
    mtp.lambda_switch_step      first step with lambda_after: 10/14.8 of the run (None: never)

    The step-valued fields are concrete ints: a config that changes ``total_steps`` should rebuild them
    (``default_train_config(new_total)`` or ``paper_schedule_fields``), or set them by hand.
    """
    f = paper_schedule_fields(total_steps, peak_lr, warmup_steps)
    c = ml_collections.ConfigDict()
    c.total_steps = int(total_steps)
    c.nonfinite = "skip"
    c.optim = ml_collections.ConfigDict(dict(
        peak_lr=float(f["optim"]["peak_lr"]), warmup_steps=f["optim"]["warmup_steps"],
        constant_steps=f["optim"]["constant_steps"], cosine_steps=f["optim"]["cosine_steps"],
        cosine_end_lr=float(f["optim"]["cosine_end_lr"]),
        final_stages=[tuple(s) for s in f["optim"]["final_stages"]],
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, bf16_moments=False))
    c.balance = ml_collections.ConfigDict()
    c.balance.gamma = 0.001
    c.balance.gamma_zero_after_step = config_dict.placeholder(int)
    c.balance.gamma_zero_after_step = f["balance"]["gamma_zero_after_step"]
    c.balance.alpha = 1e-4
    c.balance.bias_update = True
    c.mtp = ml_collections.ConfigDict()
    c.mtp.lambda_ = 0.3
    c.mtp.lambda_after = 0.1
    c.mtp.lambda_switch_step = config_dict.placeholder(int)
    c.mtp.lambda_switch_step = f["mtp"]["lambda_switch_step"]
    return c


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def validate_train_config(tc) -> None:
    """Raise ValueError naming the field for a bad train config: every rate, weight and schedule value a finite
    number in range (gamma = inf would turn the router bias non-finite), every step count a non-negative int."""
    def check(ok, field, rule):
        if not ok:
            raise ValueError(f"train config {field}: {rule}")
    check(tc.nonfinite in NONFINITE_POLICIES, "nonfinite", f"must be one of {NONFINITE_POLICIES}, got {tc.nonfinite!r}")
    check(_is_count(tc.total_steps) and tc.total_steps >= 1, "total_steps",
          f"must be an int >= 1, got {tc.total_steps!r}")
    o, b, m = tc.optim, tc.balance, tc.mtp
    for field, v in (("optim.peak_lr", o.peak_lr), ("optim.cosine_end_lr", o.cosine_end_lr), ("optim.b1", o.b1),
                     ("optim.b2", o.b2), ("optim.eps", o.eps), ("optim.weight_decay", o.weight_decay),
                     ("balance.gamma", b.gamma), ("balance.alpha", b.alpha), ("mtp.lambda_", m.lambda_),
                     ("mtp.lambda_after", m.lambda_after)):
        check(_is_number(v), field, f"must be a finite number, got {v!r}")
    check(o.clip_norm is None or _is_number(o.clip_norm), "optim.clip_norm",
          f"must be None or a finite number, got {o.clip_norm!r}")
    for field in ("warmup_steps", "constant_steps", "cosine_steps"):
        check(_is_count(o[field]), f"optim.{field}", f"must be an int >= 0, got {o[field]!r}")
    stages = o.final_stages
    check(isinstance(stages, (list, tuple)) and all(
        isinstance(st, (list, tuple)) and len(st) == 2 and _is_count(st[0]) and _is_number(st[1]) and st[1] >= 0
        for st in stages), "optim.final_stages", f"must be a list of (n_steps >= 0, finite lr >= 0), got {stages!r}")
    for field, v in (("balance.gamma_zero_after_step", b.gamma_zero_after_step),
                     ("mtp.lambda_switch_step", m.lambda_switch_step)):
        check(v is None or _is_count(v), field, f"must be None (never) or an int >= 0, got {v!r}")
    check(o.cosine_end_lr >= 0, "optim.cosine_end_lr", f"must be >= 0, got {o.cosine_end_lr}")
    check(o.peak_lr >= 0, "optim.peak_lr", f"must be >= 0, got {o.peak_lr}")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", f"must be in [0, 1), got {o.b1}, {o.b2}")
    check(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    b = tc.balance
    check(b.gamma >= 0, "balance.gamma", f"must be >= 0, got {b.gamma}")
    check(b.alpha >= 0, "balance.alpha", f"must be >= 0, got {b.alpha}")
    check(b.get("scope", "sequence") in BALANCE_SCOPES, "balance.scope",
          f"must be one of {BALANCE_SCOPES}, got {b.get('scope')!r}")
    check(tc.mtp.lambda_ >= 0 and tc.mtp.lambda_after >= 0, "mtp.lambda_/lambda_after", "must be >= 0")


class Schedules(NamedTuple):
    """Pure functions of the step: learning rate, MTP lambda, bias-update gamma."""
    lr: Callable
    lam: Callable
    gamma: Callable


def schedules_from_config(tc) -> Schedules:
    return Schedules(lr=schedule_from_config(tc.optim),
                     lam=step_function(tc.mtp.lambda_, tc.mtp.lambda_after, tc.mtp.lambda_switch_step),
                     gamma=step_function(tc.balance.gamma, 0.0, tc.balance.gamma_zero_after_step))


# ---------------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """step     int32: batches consumed (skipped ones included); the clock of every schedule
    params   the "params" collection (fp32 master weights)
    opt_state  the optax state of ``make_optimizer(train_cfg.optim)`` (moments of params only)
    router   the "router" collection: the aux-loss-free bias of every MoE layer (fp32, outside the optimizer)
    skipped  int32: steps skipped for a non-finite loss/gradient/update"""

    step: jax.Array
    params: Any
    opt_state: Any
    router: Any
    skipped: jax.Array


def init_train_state(model_cfg: ModelConfig, train_cfg, rng: jax.Array, seq_len: Optional[int] = None,
                     variables: Optional[Dict[str, Any]] = None) -> TrainState:
    """Fresh state: model.init (init std from the config, 0.006 for V3), zero router bias, zero Adam moments.
    ``variables`` ({"params", "router"}, e.g. from hf.load_pretrained) replaces model.init (``rng`` is then
    unused)."""
    if variables is None:
        variables = model_lib.init(model_cfg, rng, seq_len)
    params, router = variables["params"], variables.get("router", {})
    opt_state = jax.jit(make_optimizer(train_cfg.optim).init)(params)  # jitted: eager init compiles per leaf
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state, router=router,
                      skipped=jnp.zeros([], jnp.int32))


# ---------------------------------------------------------------------------------------------------------------
# Aux-loss-free bias update
# ---------------------------------------------------------------------------------------------------------------
def bias_update(bias: jax.Array, load: jax.Array, gamma) -> jax.Array:
    """b_i += gamma * sign(mean_j load_j - load_i) along the last (expert) axis, independently for every leading
    (layer) index: an over-loaded expert's bias drops by exactly gamma, an under-loaded one's rises by gamma, an
    expert at exactly the mean load keeps its bias. ``load``: routed-token counts of the whole global batch."""
    load = load.astype(jnp.float32)
    err = load.mean(-1, keepdims=True) - load
    return (bias.astype(jnp.float32) + jnp.asarray(gamma, jnp.float32) * jnp.sign(err)).astype(bias.dtype)


def update_router_bias(router, loads, gamma) -> Any:
    """``bias_update`` for every bias of the "router" collection, each from the load its own Router module
    recorded in the "router_load" collection (layers/router.py: the same module path, leaf "load" for "bias"), so
    no model layout is spelled out here. A bias whose Router did not run (the MTP modules, when the sequence is
    too short for them) keeps its value; ``make_train_step`` checks that every Router that ran was updated."""
    loads_by_module = {path[:-1]: v for path, v in traverse_util.flatten_dict(dict(loads)).items()}
    flat = traverse_util.flatten_dict(dict(router))
    new = {path: (bias_update(b, loads_by_module[path[:-1]], gamma) if path[:-1] in loads_by_module else b)
           for path, b in flat.items()}
    return traverse_util.unflatten_dict(new)


# ---------------------------------------------------------------------------------------------------------------
# Loss (V3 §2.1.2, §2.2) and metrics
# ---------------------------------------------------------------------------------------------------------------
class Normalisers(NamedTuple):
    """Counts of the WHOLE global batch that every micro-batch's loss terms divide by, so the micro-batch losses
    add up to the global batch's loss: valid targets of the main head, of each MTP depth [D], and sequences."""
    tokens: jax.Array
    mtp_tokens: Optional[jax.Array]
    sequences: int


def balance_loss(aux, alpha, K: int, T: int, n_sequences: int, scope: str = "sequence") -> jax.Array:
    """L_Bal: alpha * sum_i f_i P_i averaged over every MoE layer (main model and MTP modules) and the global
    batch's sequences (``losses.sequence_balance_loss``; ``scope="batch"``: ``losses.batch_balance_loss``). MTP
    depth k's layer sees T - k tokens."""
    loss_fn = losses.batch_balance_loss if scope == "batch" else losses.sequence_balance_loss
    groups = []  # (number of layers, their mean loss)
    if "moe" in aux:
        groups.append((aux["moe"]["load"].shape[0],
                       loss_fn(aux["moe"]["seq_counts"], aux["moe"]["seq_probs"], K, T, alpha, n_sequences)))
    if "mtp" in aux:
        for k in range(aux["mtp"]["load"].shape[0]):
            groups.append((1, loss_fn(aux["mtp"]["seq_counts"][k:k + 1], aux["mtp"]["seq_probs"][k:k + 1], K,
                                      T - k - 1, alpha, n_sequences)))
    if not groups:
        return jnp.zeros([], jnp.float32)
    return sum(n * v for n, v in groups) / sum(n for n, _ in groups)


def micro_batch_loss(out, tokens, mask, norm: Normalisers, lam, alpha, K: int, scope: str):
    """L = CE + L_MTP + L_Bal for one micro-batch (each term divided by the global batch's counts) and the sums
    the metrics need: (loss, {"ce_sum", "mtp_sums" [D], "mtp_term", "bal_term", "ep_dropped"})."""
    T = tokens.shape[1] - 1
    ce_sum, _ = losses.cross_entropy(out.logits, tokens[:, 1:], mask)
    loss = ce_sum / norm.tokens
    parts = {"ce_sum": ce_sum}
    if out.mtp_logits:
        parts["mtp_sums"] = jnp.stack([losses.cross_entropy(lk, *losses.mtp_targets(tokens, mask, k))[0]
                                       for k, lk in enumerate(out.mtp_logits, start=1)])
        parts["mtp_term"] = losses.mtp_loss(out.mtp_logits, tokens, mask, lam, norm.mtp_tokens)
        loss = loss + parts["mtp_term"]
    if alpha > 0:
        parts["bal_term"] = balance_loss(out.aux, alpha, K, T, norm.sequences, scope)
        loss = loss + parts["bal_term"]
    dropped = [out.aux[src]["ep_dropped"].sum() for src in ("moe", "mtp") if "ep_dropped" in out.aux.get(src, {})]
    if dropped:  # expert-parallel runs with a capacity factor (ops/expert_parallel.py)
        parts["ep_dropped"] = sum(dropped)
    for src in ("moe", "mtp"):
        if src in out.aux:
            parts[f"load_{src}"] = out.aux[src]["load"]
    return loss, parts


def step_metrics(loss, parts, norm: Normalisers, grad_norm, schedules, ok, new_state) -> Dict[str, jax.Array]:
    """The metrics dict of ``make_train_step`` (documented there) from the summed micro-batch parts."""
    lr, lam, gamma = schedules
    zero = jnp.zeros([], jnp.float32)
    metrics = {
        "loss": loss, "ce": parts["ce_sum"] / norm.tokens,
        "mtp_loss": parts.get("mtp_term", zero), "balance_loss": parts.get("bal_term", zero),
        "grad_norm": grad_norm, "lr": lr, "lambda_": lam, "gamma": gamma,
        "bias_norm": optax.global_norm(new_state.router) if new_state.router else zero,
        **({"router_bias": jnp.concatenate([b.reshape(-1, b.shape[-1]).astype(jnp.float32)
                                            for b in jax.tree.leaves(new_state.router)])}
           if new_state.router else {}),
        "tokens": parts["n_tokens"], "nonfinite": (~ok).astype(jnp.float32),
        "skipped": new_state.skipped.astype(jnp.float32),
    }
    if "mtp_sums" in parts:
        metrics["mtp_ce"] = parts["mtp_sums"] / norm.mtp_tokens
    if "ep_dropped" in parts:
        metrics["ep_dropped"] = parts["ep_dropped"].astype(jnp.float32)
    if "load_moe" in parts:
        load = parts["load_moe"]
        metrics["expert_load"] = load / jnp.maximum(load.sum(-1, keepdims=True), 1.0)
        metrics["max_vio_layers"] = losses.max_vio(load, per_layer=True)
        metrics["max_vio_batch"] = metrics["max_vio_layers"].mean()
    if "load_mtp" in parts:
        load = parts["load_mtp"]
        metrics["mtp_expert_load"] = load / jnp.maximum(load.sum(-1, keepdims=True), 1.0)
        metrics["mtp_max_vio"] = losses.max_vio(load, per_layer=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------
def _micro_batches(batch) -> Tuple[jax.Array, jax.Array]:
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim == 2:
        tokens = tokens[None]
    if tokens.ndim != 3:
        raise ValueError(f"batch['tokens']: expected [n_micro, b, T+1] or [B, T+1], got shape {tokens.shape}")
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(tokens.shape[:2] + (tokens.shape[2] - 1,), jnp.float32)
    else:
        mask = jnp.asarray(mask).astype(jnp.float32).reshape(tokens.shape[:2] + (tokens.shape[2] - 1,))
    return tokens.astype(jnp.int32), mask


def all_finite(tree) -> jax.Array:
    """True iff every floating-point leaf of ``tree`` is finite (integer leaves, e.g. step counts, are ignored)."""
    checks = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def apply_optimizer(opt, grads, opt_state, params, step):
    """(new params, new optimizer state, the update) of one optimizer step."""
    updates, new_opt_state = opt.update(grads, opt_state, params, step=step)
    return optax.apply_updates(params, updates), new_opt_state, updates


def update_lands(opt, optim_cfg, grads, grad_norm, opt_state, params, step, lr, ok) -> jax.Array:
    """Whether the optimizer's update may land: its norm, the new parameters and the new moments all finite. An
    update of 1e30 per element is finite and so are the parameters it makes, but its norm overflows (lr 1e30 in
    tests/train/test_loop.py), and such a step must not land.

    Decided before the update is applied, so that the step's ``where(ok, new, old)`` fuses into the update itself
    and the parameters and moments are updated in place: if ``optimizer.update_surely_finite`` proves it from
    norms of the inputs (always, in any sane run), the answer is True with no pass over the update; only
    otherwise (or when ``ok`` is already False there is nothing to decide) is the update computed a second time,
    inside a ``lax.cond`` branch, and checked element by element. On CPU this cuts the optimizer's time by about
    a third at 12.9M parameters and is even at 1.2M (BUILD.md "CPU speed")."""
    def check():
        new_params, new_opt_state, updates = apply_optimizer(opt, grads, opt_state, params, step)
        return jnp.isfinite(optax.global_norm(updates)) & all_finite((new_params, new_opt_state))

    sure = update_surely_finite(optim_cfg, params, opt_state, grad_norm, lr)
    return jax.lax.cond(sure | ~ok, lambda: jnp.asarray(True), check)


def make_train_step(model_cfg: ModelConfig, train_cfg, dispatch=None) -> Callable[
        [TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``: pure, jittable (jit it with ``donate_argnums=0``).
    ``dispatch``: the MoE dispatch strategy (layers/moe.py; parallel/step.py passes the expert-parallel one).

    batch: {"tokens": int [n_micro, b, T+1] or [B, T+1], "mask": optional [.., T] (1 = valid target)}.
    metrics (fp32):
      loss            ce + mtp_loss + balance_loss
      ce              mean next-token CE;  mtp_loss  (lambda/D) sum_k CE_k;  mtp_ce [D]  the CE_k
      balance_loss    alpha * mean_{layers, sequences} sum_i f_i P_i
      grad_norm       global norm before clipping;  lr, lambda_, gamma  the schedules' values at this step
      expert_load     [L, E] fraction of each layer's routed tokens per expert (global batch)
      max_vio_batch   MaxVio of this batch, mean over the main model's MoE layers;  max_vio_layers [L]
      mtp_expert_load [D, E], mtp_max_vio [D]   the same for the MTP modules (when D > 0)
      bias_norm       L2 norm of the whole router collection after the update
      router_bias     [rows, E] every MoE layer's bias after the update (the router collection's leaves in tree
                      order, each [.., E] flattened to rows: the main model's layers, then the MTP modules')
      tokens          valid target tokens in the batch
      nonfinite       1 if this step was skipped;  skipped  the running count
      ep_dropped      routed rows dropped by a capacity-limited expert-parallel all-to-all (only with an "expert"
                      mesh axis > 1; always 0 with the default dropless buffers)
    """
    validate_train_config(train_cfg)
    net = model_lib.Transformer(model_cfg, dispatch=dispatch)
    opt = make_optimizer(train_cfg.optim)
    sch = schedules_from_config(train_cfg)
    alpha = float(train_cfg.balance.alpha)
    bias_on = bool(train_cfg.balance.bias_update)
    K = model_cfg.num_experts_per_tok
    scope = train_cfg.balance.get("scope", "sequence")

    def train_step(state: TrainState, batch):
        tokens, mask = _micro_batches(batch)
        n_micro, b, T1 = tokens.shape
        D = model_cfg.num_nextn_predict_layers if T1 - 1 > model_cfg.num_nextn_predict_layers else 0
        step = state.step
        lr, lam, gamma = sch.lr(step), sch.lam(step), sch.gamma(step)
        norm = Normalisers(
            tokens=jnp.maximum(mask.sum(), 1.0),
            mtp_tokens=jnp.stack([jnp.maximum(mask[..., k:].sum(), 1.0) for k in range(1, D + 1)]) if D else None,
            sequences=n_micro * b)

        def loss_fn(params, tok, m):
            out, loads = net.apply({"params": params, "router": state.router}, tok[:, :-1], mutable=[LOAD_COLLECTION])
            loss, parts = micro_batch_loss(out, tok, m, norm, lam, alpha, K, scope)
            return loss, (parts, loads.get(LOAD_COLLECTION, {}))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(acc, xs):
            g_acc, l_acc = acc
            (loss, aux), g = grad_fn(state.params, *xs)
            g_acc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + loss), aux

        if n_micro == 1:  # the same sums without the loop and its zero-initialised fp32 accumulators
            (loss, (parts, loads)), grads = grad_fn(state.params, tokens[0], mask[0])
            grads = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), grads)
        else:
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, loss), (parts, loads) = jax.lax.scan(body, (zeros, jnp.zeros([], jnp.float32)), (tokens, mask))
            parts, loads = jax.tree_util.tree_map(lambda x: x.sum(0), (parts, loads))  # global-batch totals
        parts["n_tokens"] = mask.sum()
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)

        grad_norm = optax.global_norm(grads)

        new_router = state.router
        if bias_on:
            n_bias, n_load = (len(traverse_util.flatten_dict(dict(t))) for t in (state.router, loads))
            if D and n_load != n_bias:  # every Router ran: each must have recorded its load
                raise ValueError(f"update_router_bias: {n_bias} router biases but {n_load} recorded loads")
            new_router = update_router_bias(state.router, loads, gamma)
        # everything that reaches a checkpoint must be finite, the router bias included
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_router)
        ok = ok & update_lands(opt, train_cfg.optim, grads, grad_norm, state.opt_state, state.params, step, lr, ok)
        params_out, opt_state_out = guarded_step(opt, train_cfg.optim, grads, state.opt_state, state.params,
                                                 step, lr, ok)
        new_state = TrainState(step=step + 1,
                               params=params_out,
                               opt_state=opt_state_out,
                               router=tree_where(ok, new_router, state.router),
                               skipped=state.skipped + (~ok).astype(jnp.int32))
        return new_state, step_metrics(loss, parts, norm, grad_norm, (lr, lam, gamma), ok, new_state)

    return train_step


def make_eval_step(model_cfg: ModelConfig, dispatch=None) -> Callable[[Any, Any, Dict[str, jax.Array]],
                                                                       Dict[str, jax.Array]]:
    """``eval_step(params, router, batch) -> sums`` for validation (jittable; the loop adds them up):

      ce_sum, count         summed CE of the valid targets and their number (loss = ce_sum / count)
      load [L, E]           routed tokens per expert of the main model's MoE layers (sum over the val set, then
                            losses.max_vio -> MaxVio_global)
      mtp_load [D, E], mtp_ce_sum [D], mtp_count [D]   the same for the MTP modules, when the model has them
      bytes                 sum of batch["target_bytes"] over valid targets, when given (BPB = ce_sum / ln 2 / bytes)
    batch tokens [B, T+1] or [n, b, T+1] (flattened). ``dispatch``: as for ``make_train_step``."""
    net = model_lib.Transformer(model_cfg, dispatch=dispatch)

    def eval_step(params, router, batch):
        tokens, mask = _micro_batches(batch)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        mask = mask.reshape(-1, mask.shape[-1])
        out = net.apply({"params": params, "router": router}, tokens[:, :-1])
        ce_sum, count = losses.cross_entropy(out.logits, tokens[:, 1:], mask)
        res = {"ce_sum": ce_sum, "count": count}
        res["load"] = (out.aux["moe"]["load"] if "moe" in out.aux
                       else jnp.zeros((0, model_cfg.n_routed_experts), jnp.float32))
        if out.mtp_logits:
            sc = [losses.cross_entropy(lk, *losses.mtp_targets(tokens, mask, k))
                  for k, lk in enumerate(out.mtp_logits, start=1)]
            res["mtp_ce_sum"] = jnp.stack([s for s, _ in sc])
            res["mtp_count"] = jnp.stack([c for _, c in sc])
        if "mtp" in out.aux:
            res["mtp_load"] = out.aux["mtp"]["load"]
        if batch.get("target_bytes") is not None:
            tb = jnp.asarray(batch["target_bytes"]).astype(jnp.float32).reshape(mask.shape)
            res["bytes"] = (tb * mask).sum()
        return res

    return eval_step
