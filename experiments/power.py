"""What the pilot runs say, and what the reported runs can resolve (docs/experiments.md "Power").

Read by experiments/sweep.py for RESULTS.md's "Pilot" and "Power" sections and the "minimum detectable
difference" of each claim; everything here is computed from committed run logs (experiments/results/*/runs/).

Definitions (d = a - b per seed, the paired difference the verdicts use; n seeds):
  paired SD         sd of d over the pilot's held-out seeds (experiments/configs/pilot.py, NOISE_PAIRS)
  MDD(n)            2 sd / sqrt(n): the smallest |mean d| the "2 SE" rule can call a difference at n seeds
  seeds needed      for a "less" claim with the paper's relative effect e (a - b over b): the least n with
                    MDD(n) <= |e| x the arms' mean; for an "equal"/"rel_within" claim with tolerance tol: the least
                    n with MDD(n) <= tol x the mean (equivalence needs |d| + 2 SE inside the tolerance, so even a
                    zero gap needs MDD <= tol x mean)
  validation SE     the sampling error of the validation set itself: per seed, the sd of the per-batch
                    differences a - b over the validation batches (the same batches in every run) / sqrt(batches)
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from deepseek_jax.metrics import read_jsonl


def run_path(results_root: str, experiment: str, arm: str, seed: int) -> str:
    return os.path.join(results_root, experiment, "runs", arm, f"seed{seed}")


def validation(results_root: str, experiment: str, arm: str, seed: int) -> List[dict]:
    p = os.path.join(run_path(results_root, experiment, arm, seed), "validation.jsonl")
    return read_jsonl(p) if os.path.exists(p) else []


def finished(results_root: str, experiment: str, arm: str, seed: int) -> bool:
    return os.path.exists(os.path.join(run_path(results_root, experiment, arm, seed), "summary.json"))


def sample_sd(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


# t(0.975, dof) for the confidence intervals (two-sided 95%)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(dof: int) -> float:
    return T975.get(dof, 1.96 + 2.4 / max(dof, 1))


# ---------------------------------------------------------------------------------------------------------------
# Pilot 1: the bias speed
# ---------------------------------------------------------------------------------------------------------------
def gamma_pilot(pilot, results_root: str) -> Optional[dict]:
    """{"rows": [{gamma, window_max_vio, final_max_vio, final_loss}], "chosen": gamma or None} from the pilot's
    gamma arms (the rule in experiments/configs/pilot.py); None when no gamma arm has finished."""
    rows = []
    for g in pilot.GAMMAS:
        arm = f"gamma_{g:g}"
        for seed in pilot.ARM_SEEDS[arm]:
            if not finished(results_root, pilot.EXPERIMENT, arm, seed):
                continue
            val = validation(results_root, pilot.EXPERIMENT, arm, seed)
            window = [r["max_vio_global"] for r in val if r["step"] >= pilot.SECOND_HALF]
            rows.append({"gamma": g, "seed": seed, "window_max_vio": sum(window) / len(window),
                         "final_max_vio": val[-1]["max_vio_global"], "final_loss": val[-1]["loss"]})
    if not rows:
        return None
    chosen = None
    if len(rows) == len(pilot.GAMMAS):
        best = min(r["window_max_vio"] for r in rows)
        chosen = min(r["gamma"] for r in rows if r["window_max_vio"] <= best + pilot.TIE)
    return {"rows": rows, "chosen": chosen}


# ---------------------------------------------------------------------------------------------------------------
# Pilot 2: the paired noise
# ---------------------------------------------------------------------------------------------------------------
def paired_diffs(results_root: str, exp_a: str, arm_a: str, exp_b: str, arm_b: str, metric: str,
                 seeds: Sequence[int]) -> Dict[int, float]:
    """{seed: final metric of a - final metric of b} over the seeds both finished."""
    out = {}
    for s in seeds:
        va, vb = validation(results_root, exp_a, arm_a, s), validation(results_root, exp_b, arm_b, s)
        if finished(results_root, exp_a, arm_a, s) and finished(results_root, exp_b, arm_b, s) and \
                metric in va[-1] and metric in vb[-1]:
            out[s] = va[-1][metric] - vb[-1][metric]
    return out


def noise_pilot(pilot, results_root: str, metrics=("loss", "bpb", "max_vio_global")) -> Dict[str, dict]:
    """{pair name: {"a", "b", "same_init", "n", "mean_b": {metric}, metric: paired sd}} for every pilot
    contrast with >= 2 finished seeds."""
    out = {}
    for name, a, b, same_init in pilot.NOISE_PAIRS:
        rec = {"a": a, "b": b, "same_init": same_init, "mean_b": {}}
        for m in metrics:
            d = paired_diffs(results_root, pilot.EXPERIMENT, a, pilot.EXPERIMENT, b, m, pilot.NOISE_SEEDS)
            if len(d) >= 2:
                rec[m] = sample_sd(list(d.values()))
                rec["n"] = len(d)
                vb = [validation(results_root, pilot.EXPERIMENT, b, s)[-1][m] for s in d]
                rec["mean_b"][m] = sum(vb) / len(vb)
        if "n" in rec:
            out[name] = rec
    return out


def mdd(sd: float, n: int) -> float:
    """Minimum detectable difference of the 2-SE rule at n paired seeds."""
    return 2.0 * sd / math.sqrt(n)


def seeds_needed(sd: float, target: float) -> float:
    """Least n with mdd(sd, n) <= target (inf when target is 0)."""
    if target <= 0:
        return math.inf
    return max(2, math.ceil((2.0 * sd / target) ** 2))


def validation_se(results_root: str, experiment: str, a: str, b: str, seeds: Sequence[int]) -> Optional[float]:
    """Mean over seeds of the validation set's own standard error of the loss difference a - b (the per-batch
    differences on the same validation batches); None when the runs did not record per-batch losses."""
    ses = []
    for s in seeds:
        va, vb = validation(results_root, experiment, a, s), validation(results_root, experiment, b, s)
        if not (va and vb and "loss_batches" in va[-1] and "loss_batches" in vb[-1]):
            continue
        d = [x - y for x, y in zip(va[-1]["loss_batches"], vb[-1]["loss_batches"])]
        if len(d) > 1:
            ses.append(sample_sd(d) / math.sqrt(len(d)))
    return sum(ses) / len(ses) if ses else None


def per_seed_power_law(rows: List[dict], metric: str, fit) -> Optional[dict]:
    """The power-law exponent fitted per seed (every size of that seed), and its 95% t-interval over seeds:
    {"k": [...], "mean", "se", "lo", "hi", "n"}; None with fewer than 2 seeds that ran every size."""
    arms = sorted({r["arm"] for r in rows})
    by_seed: Dict[int, List[dict]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)
    ks = []
    for seed, rs in sorted(by_seed.items()):
        if sorted(r["arm"] for r in rs) != arms or not all(math.isfinite(r[metric]) for r in rs):
            continue
        ks.append(fit([r["compute_flops"] for r in rs], [r[metric] for r in rs])[1])
    if len(ks) < 2:
        return None
    m, se = sum(ks) / len(ks), sample_sd(ks) / math.sqrt(len(ks))
    h = t975(len(ks) - 1) * se
    return {"k": ks, "mean": m, "se": se, "lo": m - h, "hi": m + h, "n": len(ks)}


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# Pilot 3: the peak learning rate
# ---------------------------------------------------------------------------------------------------------------
def lr_pilot(pilot, results_root: str) -> Optional[dict]:
    """The rule of experiments/configs/pilot.py step 3: {"rows": [{lr, pair, sd, mean_loss, n}], "low_lr_wins"}
    from the same-init contrasts at the base's peak LR and at pilot.LOW_LR; None until both have >= 2 seeds."""
    noise = noise_pilot(pilot, results_root, metrics=("loss",))
    pairs = {name: (a, b) for name, a, b, _ in pilot.NOISE_PAIRS}
    if not ("same_init" in noise and "same_init_lr1e-3" in noise):
        return None
    rows = []
    for name in ("same_init", "same_init_lr1e-3"):
        a, b = pairs[name]
        seeds = [s for s in pilot.NOISE_SEEDS if finished(results_root, pilot.EXPERIMENT, a, s)
                 and finished(results_root, pilot.EXPERIMENT, b, s)]
        losses = [validation(results_root, pilot.EXPERIMENT, arm, s)[-1]["loss"] for arm in (a, b) for s in seeds]
        rows.append({"pair": name, "a": a, "b": b, "sd": noise[name]["loss"], "n": noise[name]["n"],
                     "mean_loss": sum(losses) / len(losses)})
    base_row, low = rows
    wins = low["sd"] < base_row["sd"] and low["mean_loss"] <= base_row["mean_loss"] + base_row["sd"]
    return {"rows": rows, "low_lr_wins": wins}
