"""Run an experiment's arms x seeds, aggregate them, and regenerate experiments/results/RESULTS.md.

    python -m experiments.sweep balancing              # every arm x seed of experiments/configs/balancing.py
    python -m experiments.sweep balancing --arms aux_free,none --seeds 0,1
    python -m experiments.sweep --report               # only rebuild the tables/plots/RESULTS.md from committed logs

Resumable: a run whose small logs are already in experiments/results/<experiment>/runs/<arm>/seed<s>/ with the
same config is skipped; an interrupted run is resumed from its checkpoint in runs/sweeps/... (the training loop's
own resume). A committed run whose config no longer matches the experiment file is "stale": the sweep stops and
says so, unless --rerun-stale is given.

Each run is ``python -m experiments.run --config=experiments/configs/<exp>.py:<arm>,seed=<s>`` in a subprocess.
After it finishes, its config.json, metrics.jsonl, validation.jsonl and summary.json (machine, code version,
corpus fingerprint) are copied to experiments/results/<exp>/runs/<arm>/seed<s>/ together with sweep.json (the
command, wall time, date), and then

  experiments/results/<exp>/runs.csv     one row per run: final validation loss, BPB, MaxVio_global, derived values
  experiments/results/<exp>/arms.csv     per arm: mean and sample std over seeds, n
  experiments/results/<exp>/curves.png   validation loss (and MaxVio_global) vs step, mean over seeds per arm
  experiments/results/<exp>/fit.png      scaling only: loss vs compute with the fitted power law
  experiments/results/RESULTS.md         every experiment's claims: the paper's number, ours (mean +- std over
                                         seeds), a verdict and why; claims without >= 3 seeds per arm are listed
                                         as "not run yet" with the command that runs them.
  README.md                              the summary table, between the README_BEGIN / README_END markers

Verdicts (``verdict``), with d = mean_a - mean_b and SE its standard error: when both arms ran the same >= 3 seeds
(seed s of every arm shares the initialisation and the data order) d and SE are those of the paired per-seed
differences, SE = std(a_s - b_s) / sqrt(n); otherwise SE = sqrt(s_a^2/n_a + s_b^2/n_b) (sample stds over seeds):
  expect "less"        reproduced if d < -2 SE; contradicted if d > +2 SE; otherwise not at this scale
  expect "equal"       an equivalence test with tolerance tol (relative to |mean_b|; default EQUAL_TOL = 1%):
                       reproduced if |d| + 2 SE <= tol |mean_b| (the whole noise band is inside the tolerance);
                       contradicted if |d| > 2 SE and |d| > tol |mean_b|; otherwise not at this scale (no
                       difference detected, but the runs cannot resolve one as small as the tolerance)
  expect "rel_within"  the same rule with the claim's own tol (e.g. FP8's 0.25%)
  expect "power_law"   log-log least squares over all runs: reproduced if the exponent is negative with R^2 >= 0.9
                       and the arm means fall monotonically with compute; contradicted if loss does not fall with
                       compute (slope >= 0); otherwise not at this scale
Deterministic metrics (KV bytes, parameter counts) have SE = 0, so any difference is decisive.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from deepseek_jax.data import corpus as corpus_lib
from experiments import power
from deepseek_jax.train import run_config
from deepseek_jax.train.loop import run as run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
EXPERIMENTS = ("balancing", "mtp", "fp8", "attention", "moe", "moe_confirm", "scaling")
MIN_SEEDS = 3
COPIED = ("config.json", "metrics.jsonl", "validation.jsonl", "summary.json")
METRICS = ("loss", "bpb", "max_vio_global")
DERIVED = ("kv_bytes_per_token", "params_total", "params_activated", "params_mtp")  # base.derived_values


class SweepError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Experiments and runs
# ---------------------------------------------------------------------------------------------------------------
def load_experiment(name_or_path: str):
    """experiments.configs.<name>, or a python file path (tests use a toy experiment)."""
    if name_or_path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(name_or_path)[:-3], name_or_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.__file__ = os.path.abspath(name_or_path)
        return mod
    if name_or_path not in EXPERIMENTS + ("pilot",):
        raise SweepError(f"unknown experiment {name_or_path!r}; known: {list(EXPERIMENTS) + ['pilot']} (or a path "
                         f"to a .py file)")
    return importlib.import_module(f"experiments.configs.{name_or_path}")


def comparable(cfg) -> Dict[str, Any]:
    """The config as the training loop stores it in config.json (its resume check compares the same dict)."""
    return run_config.comparable_config(cfg)


def config_diff(theirs, mine) -> List[str]:
    """The fields the training loop's resume check would see as different."""
    return run_config.config_diff(theirs, mine)


def run_dir(results_root: str, experiment: str, arm: str, seed: int) -> str:
    return os.path.join(results_root, experiment, "runs", arm, f"seed{seed}")


def command_for(mod, arm: str, seed: int) -> List[str]:
    path = os.path.relpath(mod.__file__, ROOT) if mod.__file__.startswith(ROOT) else mod.__file__
    return [sys.executable, "-m", "experiments.run", f"--config={path}:{arm},seed={seed}",
            "--config.loop.progress=False"]


def subprocess_runner(cfg, cmd: List[str], timeout: Optional[float]) -> None:
    """Run one training run in its own process (fresh JAX state, a hard timeout)."""
    r = subprocess.run(cmd, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        raise SweepError(f"run failed (exit {r.returncode}): {' '.join(cmd)}")


def inprocess_runner(cfg, cmd, timeout) -> None:
    """Run in this process (tests: shares compiled programs across runs)."""
    run_training(cfg)


def arm_seeds(mod, arm: str) -> List[int]:
    """The seeds an arm runs: ``mod.ARM_SEEDS[arm]`` when the experiment sets them per arm (the pilot), else
    ``mod.SEEDS``."""
    return list(getattr(mod, "ARM_SEEDS", {}).get(arm, mod.SEEDS))


def planned_arms(mod, force: bool = False) -> List[str]:
    """The arms a sweep of ``mod`` runs by default: none for an experiment marked ``SKIP_UNRESOLVABLE``, and never
    the arms in its ``UNRESOLVABLE_ARMS`` (arms that serve only claims the power analysis finds unresolvable at
    CPU scale, RESULTS.md "Power"); ``force`` (``--force``) runs them all."""
    if force:
        return list(mod.ARMS)
    if getattr(mod, "SKIP_UNRESOLVABLE", False):
        return []
    skip = set(getattr(mod, "UNRESOLVABLE_ARMS", ()))
    return [a for a in mod.ARMS if a not in skip]


def plan_runs(mod, arms: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
              results_root: str = RESULTS, rerun_stale: bool = False):
    """(tasks, skipped): every (arm, seed) of ``mod`` not already committed with the same config, as dicts
    {mod, arm, seed, cfg, cmd}; a committed run whose config changed is stale: SweepError unless rerun_stale."""
    arms = list(arms or mod.ARMS)
    for a in arms:
        if a not in mod.ARMS:
            raise SweepError(f"unknown arm {a!r} of {mod.EXPERIMENT}; arms: {list(mod.ARMS)}")
    tasks, stale, skipped = [], [], []
    for arm in arms:
        for seed in (list(seeds) if seeds is not None else arm_seeds(mod, arm)):
            cfg = mod.get_config(f"{arm},seed={seed}")
            rd = run_dir(results_root, mod.EXPERIMENT, arm, seed)
            cmd = command_for(mod, arm, seed)
            if os.path.exists(os.path.join(rd, "summary.json")):
                with open(os.path.join(rd, "config.json")) as f:
                    if not config_diff(json.load(f), comparable(cfg)):
                        skipped.append((arm, seed))
                        continue
                stale.append(f"{arm}/seed{seed}")
                cfg.loop.overwrite = True
                cmd = cmd + ["--config.loop.overwrite=True"]
            tasks.append({"mod": mod, "arm": arm, "seed": seed, "cfg": cfg, "cmd": cmd})
    if stale and not rerun_stale:
        raise SweepError(f"committed runs of {mod.EXPERIMENT} no longer match their experiment config (stale): "
                         + ", ".join(stale) + ". Rerun with --rerun-stale to replace them.")
    return tasks, skipped


def finish_run(task, wall: float, results_root: str = RESULTS) -> str:
    """Copy a finished run's small logs into experiments/results/<exp>/runs/<arm>/seed<s>/ (+ sweep.json);
    a run that did not reach its last step is an error and copies nothing."""
    mod, cfg, cmd = task["mod"], task["cfg"], task["cmd"]
    out = cfg.loop.out_dir if os.path.isabs(cfg.loop.out_dir) else os.path.join(ROOT, cfg.loop.out_dir)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    if summary.get("step") != summary.get("total_steps"):
        raise SweepError(f"{out}: the run stopped at step {summary.get('step')} of {summary.get('total_steps')}")
    rd = run_dir(results_root, mod.EXPERIMENT, task["arm"], task["seed"])
    os.makedirs(rd, exist_ok=True)
    for name in COPIED:
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(rd, name))
    with open(os.path.join(rd, "sweep.json"), "w") as f:
        json.dump({"command": " ".join(["python"] + cmd[1:]), "wall_s": round(wall, 1),
                   "cores": task.get("cores", os.cpu_count()),
                   "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                   "machine": summary.get("machine"), "code_version": summary.get("code_version")}, f, indent=1)
    return rd


def run_experiment(mod, arms: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
                   results_root: str = RESULTS, runner: Callable = subprocess_runner, rerun_stale: bool = False,
                   timeout: Optional[float] = None, log: Callable = print) -> Dict[str, List]:
    """Run every (arm, seed) not already finished, one after another; returns {"ran", "skipped"} lists."""
    tasks, skipped = plan_runs(mod, arms, seeds, results_root, rerun_stale)
    done = {"ran": [], "skipped": skipped}
    for task in tasks:
        log(f"[{mod.EXPERIMENT}] {task['arm']} seed {task['seed']}: {' '.join(task['cmd'][1:])}")
        t0 = time.time()
        runner(task["cfg"], task["cmd"], timeout)
        finish_run(task, time.time() - t0, results_root)
        done["ran"].append((task["arm"], task["seed"]))
    return done


def git_commit(paths: Sequence[str], message: str, log: Callable = print, tries: int = 5) -> bool:
    """``git add -f`` + ``git commit --only`` of exactly ``paths`` (other staged or edited files are left alone);
    retried while another git process holds the index lock. False (logged) if it never went through."""
    for i in range(tries):
        add = subprocess.run(["git", "add", "-f", "--", *paths], cwd=ROOT, capture_output=True, text=True)
        com = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=ROOT, capture_output=True,
                             text=True) if add.returncode == 0 else add
        if com.returncode == 0:
            return True
        if "index.lock" not in (com.stderr + com.stdout):
            break
        time.sleep(2 + 3 * i)
    log(f"[sweep] git commit of {', '.join(paths)} failed: {(com.stderr or com.stdout).strip()}")
    return False


def run_parallel(tasks: List[dict], workers: int, results_root: str = RESULTS, commit: bool = False,
                 timeout: Optional[float] = None, log: Callable = print) -> List[tuple]:
    """Run ``tasks`` (plan_runs's, several experiments may be mixed) in ``workers`` subprocesses at a time, each
    pinned to its own CPU core (workers > 1; one core a run measured ~1.5x the throughput of one run on two cores,
    docs/experiments.md "Compute budget"). A finished run's logs are copied at once (finish_run); with ``commit``,
    an arm is committed when its last planned seed has finished, so a commit never holds a half-finished arm.
    A failed run is logged and left out; the others go on. While the file runs/sweep.pause exists no new run
    starts (the running ones finish): a pause that keeps other work off the sweep's cores without stopping a run
    mid-way (its wall time is the budget's measure). Returns the (experiment, arm, seed) that finished."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    pending, running, finished = list(tasks), {}, []
    left = Counter((t["mod"].EXPERIMENT, t["arm"]) for t in tasks)
    free = list(range(max(1, workers)))
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
    pause = os.path.join(ROOT, "runs", "sweep.pause")
    paused = False
    while pending or running:
        if os.path.exists(pause) != paused:
            paused = not paused
            log(f"[sweep] {'paused: no new run starts while' if paused else 'resumed: removed'} {pause}")
        while pending and free and not paused:
            slot, task = free.pop(0), pending.pop(0)
            pin = {cores[slot % len(cores)]} if workers > 1 else None
            task["cores"] = 1 if pin else len(cores)
            logf = open(os.path.join(ROOT, "runs", f"sweep_worker{slot}.log"), "a")
            log(f"[{task['mod'].EXPERIMENT}] {task['arm']} seed {task['seed']} (worker {slot}"
                f"{f', core {min(pin)}' if pin else ''}): {' '.join(task['cmd'][1:])}")
            proc = subprocess.Popen(task["cmd"], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                    preexec_fn=(lambda p=pin: os.sched_setaffinity(0, p)) if pin else None)
            running[proc.pid] = (proc, slot, task, time.time(), logf)
        time.sleep(1.0)
        for pid, (proc, slot, task, t0, logf) in list(running.items()):
            rc = proc.poll()
            if rc is None and not (timeout and time.time() - t0 > timeout):
                continue
            if rc is None:
                proc.kill()
                proc.wait()
                rc = "timeout"
            logf.close()
            del running[pid]
            free.append(slot)
            key = (task["mod"].EXPERIMENT, task["arm"])
            if rc != 0:
                log(f"[{key[0]}] {key[1]} seed {task['seed']}: FAILED ({rc}); see runs/sweep_worker{slot}.log")
                continue
            try:
                finish_run(task, time.time() - t0, results_root)
            except (SweepError, OSError) as e:
                log(f"[{key[0]}] {key[1]} seed {task['seed']}: {e}")
                continue
            finished.append((key[0], key[1], task["seed"]))
            left[key] -= 1
            log(f"[{key[0]}] {key[1]} seed {task['seed']}: done in {time.time() - t0:.0f} s")
            if commit and left[key] == 0:
                arm_dir = os.path.dirname(run_dir(results_root, key[0], key[1], task["seed"]))
                n = len([d for d in os.listdir(arm_dir) if d.startswith("seed")])
                git_commit([os.path.relpath(arm_dir, ROOT)], f"sweep: {key[0]}/{key[1]} finished ({n} seeds)", log)
    return finished


# ---------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(mod, results_root: str = RESULTS) -> List[Dict[str, Any]]:
    """One row per committed run: arm, seed, step, the final validation metrics, derived values."""
    from experiments.configs import base
    rows, derived = [], {}
    root = os.path.join(results_root, mod.EXPERIMENT, "runs")
    for arm in mod.ARMS:
        adir = os.path.join(root, arm)
        if not os.path.isdir(adir):
            continue
        for name in sorted(os.listdir(adir)):
            rd = os.path.join(adir, name)
            if not (name.startswith("seed") and os.path.exists(os.path.join(rd, "summary.json"))):
                continue
            val = _read_jsonl(os.path.join(rd, "validation.jsonl"))
            if not val:
                continue
            if is_stale(mod, arm, int(name[4:]), rd):
                continue
            last = val[-1]
            sw = {}
            if os.path.exists(os.path.join(rd, "sweep.json")):
                with open(os.path.join(rd, "sweep.json")) as f:
                    sw = json.load(f)
            row = {"arm": arm, "seed": int(name[4:]), "step": last["step"],
                   **{m: last.get(m, float("nan")) for m in METRICS}, "wall_s": sw.get("wall_s", float("nan"))}
            if arm not in derived:
                derived[arm] = base.derived_values(mod.get_config(arm))
            row.update(derived[arm])
            if hasattr(mod, "COMPUTE"):
                row["compute_flops"] = mod.COMPUTE[arm]
            rows.append(row)
    return rows


def is_stale(mod, arm: str, seed: int, rd: str) -> bool:
    """A committed run whose config.json differs from what its experiment file builds now (a rerun replaces it
    with ``--rerun-stale``); stale runs are left out of every table and verdict, and counted in RESULTS.md."""
    p = os.path.join(rd, "config.json")
    if not os.path.exists(p):
        return True
    with open(p) as f:
        return bool(config_diff(json.load(f), comparable(mod.get_config(f"{arm},seed={seed}"))))


def stale_runs(mod, results_root: str = RESULTS) -> List[str]:
    root = os.path.join(results_root, mod.EXPERIMENT, "runs")
    out = []
    for arm in mod.ARMS:
        adir = os.path.join(root, arm)
        for name in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
            rd = os.path.join(adir, name)
            if name.startswith("seed") and os.path.exists(os.path.join(rd, "summary.json")) and \
                    is_stale(mod, arm, int(name[4:]), rd):
                out.append(f"{arm}/{name}")
    return out


def arm_stats(rows: List[dict], metric: str) -> Dict[str, Dict[str, float]]:
    """{arm: {"mean", "std" (sample, ddof 1; 0 for one run), "n"}} over the finite values of ``metric``."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        v = [float(r[metric]) for r in rows if r["arm"] == arm and metric in r and math.isfinite(float(r[metric]))]
        if not v:
            continue
        m = sum(v) / len(v)
        s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        out[arm] = {"mean": m, "std": s, "n": len(v)}
    return out


def fit_power_law(compute: Sequence[float], loss: Sequence[float]):
    """Least squares of log(loss) = log(a) + k log(C): returns (a, k, r2). L = a C^k, k < 0 when loss falls."""
    x = [math.log(c) for c in compute]
    y = [math.log(v) for v in loss]
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    k = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    a = math.exp(my - k * mx)
    ss_res = sum((b - (math.log(a) + k * xa)) ** 2 for xa, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    return a, k, (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def _fmt(x: float) -> str:
    if float(x).is_integer():
        return f"{int(x):,}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.4g}" if abs(x) < 1e-3 else f"{x:.4f}".rstrip("0").rstrip(".") if abs(x) < 10 else f"{x:.2f}"


def _pm(s: Dict[str, float]) -> str:
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])}" if s["std"] else _fmt(s["mean"])


def _paired(rows: List[dict], metric: str, a: str, b: str):
    """(mean, SE, n) of the per-seed differences a - b over the seeds both arms ran, when there are at least
    MIN_SEEDS of them (seed s of every arm shares the initialisation and the data order); else None."""
    va = {r["seed"]: float(r[metric]) for r in rows if r["arm"] == a and metric in r}
    vb = {r["seed"]: float(r[metric]) for r in rows if r["arm"] == b and metric in r}
    common = sorted(set(va) & set(vb))
    if len(common) < MIN_SEEDS:
        return None
    diffs = [va[s] - vb[s] for s in common]
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / (len(diffs) - 1))
    return m, sd / math.sqrt(len(diffs)), len(diffs)


EQUAL_TOL = 0.01  # default tolerance (relative) of an "equal" claim; a claim may set its own "tol"


def verdict(claim: dict, stats: Dict[str, Dict[str, float]], rows: Optional[List[dict]] = None):
    """(verdict, ours, why) for one claim, or None when its arms lack MIN_SEEDS runs (see the module docstring)."""
    expect = claim["expect"]
    if expect == "power_law":
        arms = list(stats)
        if len(arms) < 2 or any(stats[a]["n"] < MIN_SEEDS for a in arms):
            return None
        pts = [(r["compute_flops"], r[claim["metric"]]) for r in rows if math.isfinite(r[claim["metric"]])]
        a, k, r2 = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        by_c = sorted(arms, key=lambda arm: next(r["compute_flops"] for r in rows if r["arm"] == arm))
        means = [stats[arm]["mean"] for arm in by_c]
        monotone = all(m2 < m1 for m1, m2 in zip(means, means[1:]))
        cs = [r["compute_flops"] for r in rows]
        ci = power.per_seed_power_law(rows, claim["metric"], fit_power_law)
        ci_txt = (f"; exponent per seed {-ci['mean']:.4f}, 95% CI [{-ci['hi']:.4f}, {-ci['lo']:.4f}] over "
                  f"{ci['n']} seeds" if ci else "")
        ours = f"L = {a:.3g} C^{k:.4f} (R² {r2:.3f}, {len(arms)} sizes, {max(cs) / min(cs):.0f}x compute{ci_txt})"
        excludes_zero = ci is not None and ci["hi"] < 0
        if k < 0 and r2 >= 0.9 and monotone and excludes_zero:
            return "reproduced", ours, (f"loss falls with compute as a power law, exponent {-k:.4f}, R² {r2:.3f}, "
                                        f"monotone over the sizes, and the exponent's 95% CI excludes 0.")
        if k >= 0 and (ci is None or ci["lo"] >= 0):
            return "contradicted", ours, "loss does not fall with compute in these runs."
        shape = ("not monotonically" if not monotone else "the fit is poor" if r2 < 0.9 else
                 "the exponent's 95% CI reaches 0")
        mde = (f"; minimum detectable exponent at {ci['n']} seeds (the 95% CI's half-width): "
               f"{(ci['hi'] - ci['lo']) / 2:.4f}" if ci else "")
        return ("not at this scale", ours, f"loss falls but {shape} (R² {r2:.3f}; the rule needs R² >= 0.9, "
                f"monotone arm means and a CI below 0{mde}).")
    a, b = claim["a"], claim["b"]
    if a not in stats or b not in stats or min(stats[a]["n"], stats[b]["n"]) < MIN_SEEDS:
        return None
    sa, sb = stats[a], stats[b]
    d = sa["mean"] - sb["mean"]
    se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
    n = min(sa["n"], sb["n"])
    paired = _paired(rows or [], claim["metric"], a, b)
    if paired is not None:  # same seeds (same init and data order) in both arms: the seed effect cancels
        d, se, n = paired
    ours = f"{a} {_pm(sa)} vs {b} {_pm(sb)} " + ("(by construction)" if sa.get("derived") else f"(n={n})")
    noise = (f"2 SE = {_fmt(2 * se)}" + (" of the paired per-seed difference" if paired else "")) if se else \
        "deterministic"
    if expect == "less":
        if d < -2 * se or (se == 0 and d < 0):
            return "reproduced", ours, f"{a} is lower by {_fmt(-d)} ({noise})."
        if d > 2 * se or (se == 0 and d > 0):
            return "contradicted", ours, f"{a} is higher by {_fmt(d)} ({noise}) at this scale."
        return "not at this scale", ours, (f"the difference {_fmt(d)} is within seed noise ({noise}); minimum "
                                           f"detectable difference at n={n}: {_fmt(2 * se)} "
                                           f"({2 * se / abs(sb['mean']):.2%} of {b}).")
    if expect in ("equal", "rel_within"):
        # Equivalence, not absence of evidence: "same" is reproduced only when the runs could have seen a
        # difference as small as the tolerance and did not.
        tol = claim.get("tol", EQUAL_TOL if expect == "equal" else None)
        if tol is None:
            raise SweepError(f"claim {claim['id']}: expect 'rel_within' needs a tol")
        rel, band = abs(d) / abs(sb["mean"]), (abs(d) + 2 * se) / abs(sb["mean"])
        if band <= tol:
            return "reproduced", ours, (f"relative gap {rel:.3%}, and with seed noise at most {band:.3%} "
                                        f"<= {tol:.2%} ({noise}).")
        if abs(d) > 2 * se and rel > tol:
            return "contradicted", ours, (f"relative gap {rel:.3%} > {tol:.2%}, beyond seed noise ({noise}) "
                                          f"at this scale.")
        return "not at this scale", ours, (f"relative gap {rel:.3%}, but gap + seed noise ({noise}) reaches "
                                           f"{band:.3%} > the {tol:.2%} tolerance: the runs cannot resolve it; "
                                           f"minimum detectable difference at n={n}: {_fmt(2 * se)} "
                                           f"({2 * se / abs(sb['mean']):.2%} of {b}).")
    raise SweepError(f"claim {claim['id']}: unknown expect {expect!r}")


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def _write_csv(path: str, rows: List[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def write_experiment(mod, results_root: str = RESULTS) -> List[dict]:
    """runs.csv, arms.csv and the plots of one experiment; returns the rows (empty if nothing ran)."""
    rows = collect(mod, results_root)
    if not rows:
        return rows
    out = os.path.join(results_root, mod.EXPERIMENT)
    _write_csv(os.path.join(out, "runs.csv"), rows)
    metrics = [m for m in METRICS + ("kv_bytes_per_token", "params_total", "params_activated", "wall_s")
               if any(m in r for r in rows)]
    arm_rows = []
    stats = {m: arm_stats(rows, m) for m in metrics}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        row = {"arm": arm, "n": sum(r["arm"] == arm for r in rows)}
        for m in metrics:
            if arm in stats[m]:
                row[f"{m}_mean"], row[f"{m}_std"] = stats[m][arm]["mean"], stats[m][arm]["std"]
        arm_rows.append(row)
    _write_csv(os.path.join(out, "arms.csv"), arm_rows)
    _plot(mod, rows, out, results_root)
    if getattr(mod, "TRAJECTORIES", False):
        plot_balance_trajectories(mod.EXPERIMENT, list(dict.fromkeys(r["arm"] for r in rows)), results_root,
                                  os.path.join(out, "maxvio.png"), f"{mod.EXPERIMENT}: load balance during training "
                                  "(mean over seeds)")
    return rows


def _plot(mod, rows, out, results_root) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    curves = {}
    for arm in arms:
        for r in rows:
            if r["arm"] == arm:
                val = _read_jsonl(os.path.join(run_dir(results_root, mod.EXPERIMENT, arm, r["seed"]),
                                               "validation.jsonl"))
                curves.setdefault(arm, []).append(val)
    has_vio = any("max_vio_global" in v[-1] for runs in curves.values() for v in runs if v)
    fig, axes = plt.subplots(1, 2 if has_vio else 1, figsize=(12 if has_vio else 6, 4), squeeze=False)
    for arm, runs in curves.items():
        steps = [r["step"] for r in runs[0]]
        for j, key in enumerate(("loss", "max_vio_global") if has_vio else ("loss",)):
            vals = [[rec.get(key, float("nan")) for rec in run] for run in runs if len(run) == len(steps)]
            mean = [sum(c) / len(c) for c in zip(*vals)]
            axes[0][j].plot(steps, mean, "o-", label=f"{arm} (n={len(vals)})")
            if len(vals) > 1:
                axes[0][j].fill_between(steps, [min(c) for c in zip(*vals)], [max(c) for c in zip(*vals)], alpha=0.2)
    axes[0][0].set_title(f"{mod.EXPERIMENT}: validation loss (mean, min-max over seeds)")
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("nats/token")
    axes[0][0].legend()
    if has_vio:
        axes[0][1].set_title("MaxVio_global (validation set)")
        axes[0][1].set_xlabel("step")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=90)
    plt.close(fig)
    if hasattr(mod, "COMPUTE"):
        fig, ax = plt.subplots(figsize=(6, 4))
        cs, ls = [r["compute_flops"] for r in rows], [r["loss"] for r in rows]
        ax.loglog(cs, ls, "o", label="runs")
        if len(set(cs)) >= 2:
            a, k, r2 = fit_power_law(cs, ls)
            xs = sorted(set(cs))
            ax.loglog(xs, [a * c ** k for c in xs], "-", label=f"L = {a:.3g} C^{k:.4f} (R² {r2:.3f})")
        ax.set_xlabel("compute C = M D (FLOPs)")
        ax.set_ylabel("validation loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "fit.png"), dpi=90)
        plt.close(fig)


def maxvio_trajectory_markdown(mod, rows: List[dict], results_root: str = RESULTS) -> List[str]:
    """For an experiment with TRAJECTORIES: MaxVio_global at every validation step, mean +- sample std over each
    arm's current runs (``rows``), so the course of the balance is in numbers beside its plot; the verdicts read
    only the final evaluation."""
    seeds = {}
    for r in rows:
        seeds.setdefault(r["arm"], []).append(r["seed"])
    cols, table = None, {}
    for arm, ss in seeds.items():
        vals = [_read_jsonl(os.path.join(run_dir(results_root, mod.EXPERIMENT, arm, s), "validation.jsonl"))
                for s in ss]
        vals = [v for v in vals if v and "max_vio_global" in v[-1]]
        if not vals:
            continue
        k = min(len(v) for v in vals)
        cols = cols or [rec["step"] for rec in vals[0][:k]]
        table[arm] = [[v[i]["max_vio_global"] for v in vals] for i in range(min(k, len(cols)))]
    if not table:
        return []
    out = ["MaxVio_global on the validation set at every evaluation (mean ± sample std over seeds; the verdicts "
           "read the last one):", "", "| arm | n | " + " | ".join(f"step {c}" for c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for arm, per_step in table.items():
        cells = [f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
                 for xs in per_step]
        out.append(f"| {arm} | {len(per_step[0])} | " + " | ".join(cells) + " |")
    return out + [""]


def plot_balance_trajectories(experiment: str, arms: Sequence[str], results_root: str, path: str,
                              title: str) -> bool:
    """MaxVio_batch (training batches, every logged step), MaxVio_global (validation set) and the router bias's
    spread (std over experts, mean over MoE layers) vs step, mean over each arm's committed seeds (non-stale
    not checked here: callers pass current arms), plus the final per-expert load of the first MoE layer. False
    when no run of these arms logged MaxVio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    drawn = False
    for arm in arms:
        adir = os.path.join(results_root, experiment, "runs", arm)
        seeds = sorted(n for n in os.listdir(adir) if n.startswith("seed")) if os.path.isdir(adir) else []
        mets = [_read_jsonl(os.path.join(adir, n, "metrics.jsonl")) for n in seeds]
        vals = [_read_jsonl(os.path.join(adir, n, "validation.jsonl")) for n in seeds]
        mets = [m for m in mets if m and "max_vio_batch" in m[0]]
        if not mets:
            continue
        drawn = True
        n = min(len(m) for m in mets)
        steps = [r["step"] for r in mets[0][:n]]
        mean = lambda key, runs, k: [sum(run[i][key] for run in runs) / len(runs) for i in range(k)]
        axes[0].plot(steps, mean("max_vio_batch", mets, n), label=f"{arm} (n={len(mets)})")
        vals = [v for v in vals if v and "max_vio_global" in v[-1]]
        if vals:
            k = min(len(v) for v in vals)
            axes[1].plot([r["step"] for r in vals[0][:k]], mean("max_vio_global", vals, k), "o-", label=arm)
        if "router_bias" in mets[0][0]:
            spread = lambda rec: sum(float(_sd(row)) for row in rec["router_bias"]) / len(rec["router_bias"])
            axes[2].plot(steps, [sum(spread(run[i]) for run in mets) / len(mets) for i in range(n)], label=arm)
        load = mets[0][n - 1]["expert_load"][0]
        axes[3].plot(range(len(load)), sorted(load, reverse=True), "o-", label=f"{arm} ({seeds[0]})")
    if not drawn:
        plt.close(fig)
        return False
    for ax, t in zip(axes, ("MaxVio_batch (training batches)", "MaxVio_global (validation set)",
                            "router bias: std over experts", "final load of MoE layer 1, sorted")):
        ax.set_title(t)
        ax.set_xlabel("step" if "sorted" not in t else "expert (by load)")
        ax.legend(fontsize=7)
    axes[3].axhline(1.0 / max(1, len(load)), color="grey", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _sd(xs) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _sweep_command(mod) -> str:
    name = mod.EXPERIMENT if mod.EXPERIMENT in EXPERIMENTS else os.path.relpath(mod.__file__, ROOT)
    return f"python -m experiments.sweep {name}"


def corpus_markdown(mods, results_root: str = RESULTS) -> List[str]:
    """Which corpus the committed runs read, from their summary.json and config.json (one line per distinct
    corpus): spec, fingerprint, whether that is the pinned built-in corpus, and the interpreter of runs made
    before the snapshot existed (their spec "default" then read the running interpreter's standard library)."""
    groups: Dict[tuple, int] = {}
    for mod in mods:
        root = os.path.join(results_root, mod.EXPERIMENT, "runs")
        for arm in mod.ARMS:
            adir = os.path.join(root, arm)
            for name in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
                rd = os.path.join(adir, name)
                if not os.path.exists(os.path.join(rd, "summary.json")):
                    continue
                with open(os.path.join(rd, "summary.json")) as f:
                    sm = json.load(f)
                spec = None
                if os.path.exists(os.path.join(rd, "config.json")):
                    with open(os.path.join(rd, "config.json")) as f:
                        spec = json.load(f).get("data.corpus")
                key = (spec, sm.get("corpus_fingerprint"), (sm.get("corpus") or {}).get("source"),
                       (sm.get("machine") or {}).get("python"))
                groups[key] = groups.get(key, 0) + 1
    out = []
    for (spec, fp, source, py), n in sorted(groups.items(), key=lambda kv: -kv[1]):
        same = ("the built-in corpus " + corpus_lib.BUILTIN_VERSION + " (`deepseek_jax/data/"
                + os.path.basename(corpus_lib.BUILTIN_FILE) + "`): the same documents"
                if fp == corpus_lib.BUILTIN_FINGERPRINT else "not the built-in corpus")
        if source is None:  # written before runs recorded the corpus source
            how = (f"made before the pinned snapshot existed, when spec \"default\" read the standard library of "
                   f"the running interpreter, Python {py}"
                   + (" (v1 was built from that library)" if fp == corpus_lib.BUILTIN_FINGERPRINT else ""))
        else:
            how = f"source: {source}; Python {py}"
        out.append(f"Corpus of {n} run(s): spec \"{spec}\", fingerprint `{str(fp)[:16]}...` = {same}; {how}.")
    return out


def capped_warmup_runs(mod, results_root: str = RESULTS) -> Dict[tuple, List[str]]:
    """Committed runs whose recorded train.optim.warmup_steps (their config.json) is below the one their arm's
    config sets now: {(recorded, configured): ["arm/seedN", ...]}."""
    out: Dict[tuple, List[str]] = {}
    root = os.path.join(results_root, mod.EXPERIMENT, "runs")
    for arm in mod.ARMS:
        adir = os.path.join(root, arm)
        if not os.path.isdir(adir):
            continue
        configured = mod.get_config(arm).train.optim.warmup_steps
        for name in sorted(os.listdir(adir)):
            p = os.path.join(adir, name, "config.json")
            if not os.path.exists(p):
                continue
            with open(p) as f:
                recorded = json.load(f).get("train.optim.warmup_steps")
            if isinstance(recorded, int) and recorded < configured:
                out.setdefault((recorded, configured), []).append(f"{arm}/{name}")
    return out


def results_markdown(mods, results_root: str = RESULTS) -> str:
    lines = ["# Results", "",
             "Generated by `python -m experiments.sweep` (experiments/sweep.py) from the run logs and configs under",
             "`experiments/results/<experiment>/runs/`; do not edit by hand. Ours = mean ± sample std over seeds",
             f"(n = seeds per arm; a claim needs >= {MIN_SEEDS} per arm). Verdict rules: experiments/sweep.py.",
             "These are CPU-scale runs (~10^6-10^7 tokens, models of ~10^5-10^6 parameters): a verdict says what",
             "holds at this scale, not whether the paper is right at its own.", "",
             *corpus_markdown(mods, results_root), ""]
    summary = ["| experiment | claim | paper | ours | verdict |", "|---|---|---|---|---|"]
    sections, capped_total = [], []
    unresolvable = {(r["experiment"], r["claim"]["id"]): r for r in power_rows(mods, results_root)
                    if r.get("needed", 0) > r["n_run"]}
    for mod in mods:
        rows = collect(mod, results_root)
        sec = [f"## {mod.EXPERIMENT}", "", " ".join((mod.__doc__ or "").strip().split("\n\n")[0].split()), ""]
        machines = {}
        stale = stale_runs(mod, results_root)
        for arm in mod.ARMS:
            for name in sorted(os.listdir(os.path.join(results_root, mod.EXPERIMENT, "runs", arm))) if os.path.isdir(
                    os.path.join(results_root, mod.EXPERIMENT, "runs", arm)) else []:
                p = os.path.join(results_root, mod.EXPERIMENT, "runs", arm, name, "sweep.json")
                if os.path.exists(p) and f"{arm}/{name}" not in stale:  # the machines of the current runs
                    with open(p) as f:
                        sw = json.load(f)
                    m = sw.get("machine") or {}  # the machine's core count: "cpu_count" in older runs' records
                    machines.setdefault((m.get("cpu"), m.get("cpu_count", m.get("cores")), m.get("python"),
                                         m.get("jax"), m.get("backend")), set()).add(sw.get("code_version"))
        if stale:
            capped_total.append(len(stale))
            sec += [f"Stale: {len(stale)} committed run(s) were made with a config the experiment file no longer "
                    f"builds ({', '.join(stale)}); they are left out of the tables and verdicts below until "
                    f"`{_sweep_command(mod)} --rerun-stale` replaces them.", ""]
        warm = capped_warmup_runs(mod, results_root)
        if warm:
            per_arm = lambda runs: ", ".join(f"{a} x{n}" for a, n in Counter(r.split("/")[0] for r in runs).items())
            parts = "; ".join(f"{len(runs)} with {rec} steps instead of the configured {conf} ({per_arm(runs)})"
                              for (rec, conf), runs in sorted(warm.items()))
            sec += [f"Warmup: of these, {sum(len(v) for v in warm.values())} trained with a shorter warmup than "
                    f"their config set: {parts}. They were made when an explicit train.optim.warmup_steps was "
                    "silently capped at 1% of the run (deepseek_jax/train/optimizer.py no longer caps it).", ""]
        if rows:
            counts = ", ".join(f"{a}: {sum(r['arm'] == a for r in rows)}"
                               for a in dict.fromkeys(r["arm"] for r in rows))
            sec.append(f"Runs: {len(rows)} ({counts}). Tables: `{mod.EXPERIMENT}/runs.csv`, "
                       f"`{mod.EXPERIMENT}/arms.csv`; plot: `{mod.EXPERIMENT}/curves.png`.")
            for (cpu, cores, py, jaxv, backend), codes in machines.items():
                sec.append(f"Machine: {cpu}, {cores} cores, Python {py}, jax {jaxv} ({backend}); code version(s) "
                           f"(git HEAD at "
                           f"the start of each run): {', '.join(sorted(str(c) for c in codes))}.")
            sec.append("")
        if getattr(mod, "TRAJECTORIES", False):
            sec += maxvio_trajectory_markdown(mod, rows, results_root)
        sec += ["| claim | paper | ours | verdict | why |", "|---|---|---|---|---|"]
        for claim in mod.CLAIMS:
            if claim["metric"] in DERIVED and "a" in claim:  # a property of the arms' configs: no run needed
                from experiments.configs import base
                stats = {arm: {"mean": float(base.derived_values(mod.get_config(arm))[claim["metric"]]),
                               "std": 0.0, "n": math.inf, "derived": True} for arm in (claim["a"], claim["b"])}
            else:
                stats = arm_stats(rows, claim["metric"]) if rows else {}
            v = verdict(claim, stats, rows) if rows or any(s.get("derived") for s in stats.values()) else None
            power_note = unresolvable.get((mod.EXPERIMENT, claim.get("id")))
            if power_note is not None:
                label, reason = unresolvable_text(power_note)
                power_note = f" Power analysis (before the runs): {label}, {reason}."
            if v is None:
                have = {a: s["n"] for a, s in stats.items()}
                arms = [claim["a"], claim["b"]] if "a" in claim else list(mod.ARMS)
                why = f"seeds so far: {({a: have.get(a, 0) for a in arms})}"
                cmd = _sweep_command(mod) + ("" if "a" not in claim else f" --arms {','.join(arms)}")
                unplanned = [a for a in arms if a not in planned_arms(mod)]
                if power_note and unplanned:
                    why_not = ("`SKIP_UNRESOLVABLE`" if getattr(mod, "SKIP_UNRESOLVABLE", False) else
                               f"`UNRESOLVABLE_ARMS`: {', '.join(unplanned)}")
                    row = (claim["claim"], claim["paper"], "not run", f"**{label}**",
                           power_note.strip() + f" Its runs are not made ({why_not} in the experiment "
                           f"file); `{cmd} --force` would make them.")
                else:
                    row = (claim["claim"], claim["paper"], "not run yet", "not run yet",
                           f"{why}; run `{cmd}`." + (power_note or ""))
            else:
                why = v[2]
                if claim["metric"] == "loss" and "a" in claim:
                    vse = power.validation_se(results_root, mod.EXPERIMENT, claim["a"], claim["b"],
                                              sorted({r["seed"] for r in rows}))
                    if vse is not None:
                        why += f" Validation-set SE of the difference: {_fmt(vse)}."
                row = (claim["claim"], claim["paper"], v[1], f"**{v[0]}**", why + (power_note or ""))
            if claim.get("revision"):  # a claim added to the list: when and why, in its own row
                row = row[:4] + (row[4] + f" Revised list: {claim['revision']}",)
            sec.append("| " + " | ".join(row) + " |")
            summary.append(f"| {mod.EXPERIMENT} | {claim['claim']} | {claim['paper']} | {row[2]} | {row[3]} |")
        sec.append("")
        sections += sec
    if capped_total:
        lines += [f"**Stale runs:** {sum(capped_total)} committed runs were made with configs the experiment files no "
                  "longer build (the first design: 300 steps of 8 x 128 tokens, and a warmup silently capped at 1% "
                  "of the run); each experiment's section lists them. They count in no verdict.", ""]
    extra = (pilot_markdown(results_root) + lr_markdown(results_root) + power_markdown(mods, results_root)
             + budget_markdown(mods, results_root))
    return "\n".join(lines + ["## Summary", ""] + summary + [""] + extra + sections)


def _pilot_module():
    return load_experiment("pilot")


def claim_noise(mod, claim: dict, noise: Dict[str, dict]) -> Optional[dict]:
    """The pilot contrast whose paired SD stands for a claim's noise: claim["noise"] if set, else "same_init"
    when the two arms have the same parameter count (same shapes, so seed s gives both the same initialisation),
    else "different_init"."""
    from experiments.configs import base
    kind = claim.get("noise")
    if kind is None:
        pa = base.derived_values(mod.get_config(claim["a"]))["params_total"]
        pb = base.derived_values(mod.get_config(claim["b"]))["params_total"]
        kind = "same_init" if pa == pb else "different_init"
    return noise.get(getattr(_pilot_module(), "NOISE_AT_BASE", {}).get(kind, kind))


# The most seeds per arm one claim could be given within the suite's ~12 CPU-hour budget (docs/experiments.md
# "Compute budget": a 1,500-step base run is ~8 CPU-minutes, so 10 seeds x 2 arms are ~3 CPU-hours for one claim).
AFFORDABLE_SEEDS = 10


def unresolvable_text(r: dict) -> Tuple[str, str]:
    """(label, reason) of a power row whose claim needs more seeds than it runs: "not resolvable at CPU scale"
    when it needs more than AFFORDABLE_SEEDS, else "not resolvable at the seeds run"."""
    needed = _fmt(r["needed"]) if math.isfinite(r["needed"]) else "inf"
    why = f"the target {_fmt(r['target'])} is below the MDD {_fmt(r['mdd'])} at {r['n_run']} seeds (needs {needed}"
    if r["needed"] > AFFORDABLE_SEEDS:
        return "not resolvable at CPU scale", why + f", more than the {AFFORDABLE_SEEDS} a claim can have in budget)"
    return "not resolvable at the seeds run", why + ", not run within this suite's budget)"


def power_rows(mods, results_root: str = RESULTS) -> List[dict]:
    """One row per claim with a noisy metric: the paper's effect, the pilot's paired SD, the seeds needed to
    resolve the effect, the seeds the experiment runs, and the MDD at those seeds (experiments/power.py)."""
    noise = power.noise_pilot(_pilot_module(), results_root)
    out = []
    for mod in mods:
        for claim in mod.CLAIMS:
            if claim["expect"] == "power_law" or claim["metric"] not in METRICS:
                continue
            src = claim_noise(mod, claim, noise)
            row = {"experiment": mod.EXPERIMENT, "claim": claim, "n_run": len(mod.SEEDS)}
            if src is None or claim["metric"] not in src:
                out.append(row)
                continue
            sd, scale = src[claim["metric"]], abs(src["mean_b"][claim["metric"]])
            row.update(noise_pair=src, sd=sd, scale=scale, mdd=power.mdd(sd, row["n_run"]))
            if claim["metric"] == "loss":
                pilot = _pilot_module()
                row["val_se"] = power.validation_se(results_root, pilot.EXPERIMENT, src["a"], src["b"],
                                                    pilot.NOISE_SEEDS)
            if claim["expect"] in ("equal", "rel_within"):
                tol = claim.get("tol", EQUAL_TOL)
                row.update(target=tol * scale, target_txt=f"tolerance {tol:.2%}")
            elif claim.get("paper_rel") is not None:
                row.update(target=abs(claim["paper_rel"]) * scale,
                           target_txt=f"paper effect {claim['paper_rel']:+.2%}")
            if "target" in row:
                row["needed"] = power.seeds_needed(sd, row["target"])
            out.append(row)
    return out


def power_markdown(mods, results_root: str = RESULTS) -> List[str]:
    rows = power_rows(mods, results_root)
    noise = power.noise_pilot(_pilot_module(), results_root)
    lines = ["## Power", "",
             "Computed before the reported runs, from the pilot (experiments/configs/pilot.py, held-out seeds "
             "100-102; experiments/power.py): the paired SD of a contrast whose arms share their initialisation "
             "and of one whose arms cannot, the seeds the paper's effect (or an equivalence claim's tolerance) "
             "needs under the 2-SE rule, and the minimum detectable difference (MDD = 2 SD / sqrt(n)) at the "
             "seeds each experiment runs. The paper's effect is carried over as a relative difference, scaled "
             "by the pilot's level of the metric: an assumption, since effects need not transfer across scales.",
             ""]
    if not noise:
        return lines + ["The noise pilot has not run yet: `python -m experiments.sweep pilot --workers 2`.", ""]
    lines += ["| pilot contrast | arms | seeds | paired SD of loss | of BPB | of MaxVio_global |",
              "|---|---|---|---|---|---|"]
    for name, rec in noise.items():
        lines.append(f"| {name} | {rec['a']} - {rec['b']} | {rec['n']} | "
                     + " | ".join(_fmt(rec[m]) if m in rec else "-" for m in METRICS) + " |")
    lines += ["", "| experiment | claim | metric | target | noise from | seeds needed | seeds run | MDD at seeds run "
              "| validation-set SE (pilot pair) | up front |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["claim"]
        if "sd" not in r:
            lines.append(f"| {r['experiment']} | {c['claim']} | {c['metric']} | - | (pilot missing) | - | "
                         f"{r['n_run']} | - | - | - |")
            continue
        if "needed" in r:
            verdict = "resolvable" if r["needed"] <= r["n_run"] else "**%s**: %s" % unresolvable_text(r)
            target, needed = f"{r['target_txt']} = {_fmt(r['target'])}", _fmt(r["needed"]) \
                if math.isfinite(r["needed"]) else "inf"
        else:
            verdict, target, needed = "the paper's effect is not transcribed: MDD only", "-", "-"
        vse = r.get("val_se")
        vse_txt = "-" if vse is None else _fmt(vse) + (
            f" ({'under' if vse < r['target'] / 10 else 'NOT under'} a tenth of the target)" if "target" in r else "")
        lines.append(f"| {r['experiment']} | {c['claim']} | {c['metric']} | {target} | {r['noise_pair']['a']} - "
                     f"{r['noise_pair']['b']} | {needed} | {r['n_run']} | {_fmt(r['mdd'])} | {vse_txt} | {verdict} |")
    return lines + [""]


def pilot_markdown(results_root: str = RESULTS) -> List[str]:
    pilot = _pilot_module()
    g = power.gamma_pilot(pilot, results_root)
    lines = ["## Pilot: bias speed", "",
             "Aux-loss-free balancing on held-out seed 100 at four bias speeds (experiments/configs/pilot.py; the "
             "rule, fixed before the runs: the lowest mean MaxVio_global over the validation evaluations at steps "
             f">= {pilot.SECOND_HALF}, the smaller gamma on a tie within {pilot.TIE}).", ""]
    if not g:
        return lines + ["Not run yet: `python -m experiments.sweep pilot --workers 2`.", ""]
    lines += ["| gamma | mean MaxVio_global, steps >= %d | final MaxVio_global | final val loss |" % pilot.SECOND_HALF,
              "|---|---|---|---|"]
    for r in g["rows"]:
        lines.append(f"| {r['gamma']:g} | {r['window_max_vio']:.3f} | {r['final_max_vio']:.3f} | "
                     f"{r['final_loss']:.4f} |")
    path = os.path.join(results_root, pilot.EXPERIMENT, "maxvio.png")
    if plot_balance_trajectories(pilot.EXPERIMENT, [f"gamma_{x:g}" for x in pilot.GAMMAS], results_root, path,
                                 "pilot: aux-loss-free balancing at four bias speeds (seed 100)"):
        lines += ["", f"Trajectories: `{pilot.EXPERIMENT}/maxvio.png`."]
    from experiments.configs import base
    chosen = g["chosen"]
    lines += ["", (f"Chosen: gamma = {chosen:g}; experiments/configs/base.py's GAMMA = {base.GAMMA:g}"
                   + ("." if chosen == base.GAMMA else " (DIFFERENT: the base does not follow the pilot).")
                   if chosen is not None else "Not every gamma has run yet."), ""]
    return lines


def lr_markdown(results_root: str = RESULTS) -> List[str]:
    pilot = _pilot_module()
    r = power.lr_pilot(pilot, results_root)
    lines = ["## Pilot: peak learning rate", "",
             "The same-init contrast (aux-free vs sequence-wise aux loss) on seeds "
             f"{', '.join(map(str, pilot.NOISE_SEEDS))} at the base's peak LR and at {pilot.LOW_LR:g} "
             "(experiments/configs/pilot.py step 3; the rule, fixed before these runs: the lower LR replaces the "
             "base's only if its paired SD of the loss is smaller and its mean validation loss is no worse by more "
             "than the base's paired SD).", ""]
    if r is None:
        return lines + ["Not run yet: `python -m experiments.sweep pilot --workers 2`.", ""]
    from experiments.configs import base
    lines += ["| contrast | arms | seeds | paired SD of the final loss | mean final loss (both arms) |",
              "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['pair']} | {row['a']} - {row['b']} | {row['n']} | {row['sd']:.4f} | "
                     f"{row['mean_loss']:.4f} |")
    peak = base.base_config().train.optim.peak_lr
    follow = (peak == pilot.LOW_LR) == r["low_lr_wins"]
    lines += ["", f"Outcome: {'the lower LR wins' if r['low_lr_wins'] else 'the base LR stays'}; the base's peak LR "
              f"is {peak:g}" + ("." if follow else " (DIFFERENT: the base does not follow the pilot)."), ""]
    return lines


def budget_markdown(mods, results_root: str = RESULTS) -> List[str]:
    """CPU-hours per experiment: the sum over its current (non-stale) committed runs of wall seconds x the cores
    the run had, and the runs still planned (arms x seeds) with an estimate at the mean cost of its finished runs
    (of the pilot's runs, for an experiment with none yet)."""
    lines = ["## Compute budget", "",
             "CPU-hours = sum over the current committed runs of wall time x the cores the run had (sweep.json). "
             "The sweep runs two runs at a time, each on its own core (`--workers 2`); a run's wall time includes "
             "whatever else the machine did meanwhile. Still to run: the planned arms x seeds without a current "
             "run, estimated at the experiment's mean CPU-hours per finished run (the pilot's, where none has "
             "finished). Budget: about 12 CPU-hours for the planned suite; moe_confirm, a confirmatory test added "
             "after that suite had finished, runs on top of it (docs/experiments.md).", "",
             "| experiment | runs done | CPU-hours | mean CPU-minutes a run | runs to do | estimated CPU-hours to do |",
             "|---|---|---|---|---|---|"]
    total = todo_total = 0.0
    pilot = _pilot_module()
    per_run_default = None
    for mod in [pilot] + list(mods):
        secs, n, todo = 0.0, 0, 0
        planned = set(planned_arms(mod))
        for arm in mod.ARMS:
            for seed in arm_seeds(mod, arm):
                rd = run_dir(results_root, mod.EXPERIMENT, arm, seed)
                p = os.path.join(rd, "sweep.json")
                if os.path.exists(p) and not is_stale(mod, arm, seed, rd):
                    sw = power.load_json(p)
                    cores = sw.get("cores") or (sw.get("machine") or {}).get("cpu_count") or 1
                    secs += float(sw.get("wall_s", 0.0)) * cores
                    n += 1
                elif arm in planned:
                    todo += 1
        per_run = secs / n / 3600 if n else per_run_default
        if mod is pilot and n:
            per_run_default = per_run
        est = todo * per_run if per_run is not None and todo else 0.0
        total += secs / 3600
        todo_total += est
        lines.append(f"| {mod.EXPERIMENT} | {n} | {secs / 3600:.2f} | {f'{secs / n / 60:.1f}' if n else '-'} | "
                     f"{todo} | {est:.2f} |")
    return lines + [f"| all | | {total:.2f} | | | {todo_total:.2f} |", ""]


README_BEGIN = "<!-- results table: generated by experiments/sweep.py from experiments/results/RESULTS.md -->"
README_END = "<!-- end of results table -->"


def update_readme(results_text: str, readme: str = os.path.join(ROOT, "README.md")) -> bool:
    """Replace the block between README_BEGIN and README_END in README.md with RESULTS.md's summary table.
    Returns False (and leaves README alone) when the markers are absent."""
    if not os.path.exists(readme):
        return False
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        return False
    lines = results_text.splitlines()
    i = lines.index("## Summary") + 2
    j = next(k for k in range(i, len(lines)) if not lines[k].startswith("|"))
    block = "\n".join([README_BEGIN, ""] + lines[i:j] + ["", README_END])
    head, rest = text.split(README_BEGIN, 1)
    new = head + block + rest.split(README_END, 1)[1]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return True


def write_results_md(mods=None, results_root: str = RESULTS, readme: Optional[str] = None) -> str:
    """Tables and plots of every experiment, RESULTS.md, and (with ``readme``) README's results table."""
    mods = mods if mods is not None else [load_experiment(e) for e in EXPERIMENTS]
    for mod in mods:
        write_experiment(mod, results_root)
    text = results_markdown(mods, results_root)
    os.makedirs(results_root, exist_ok=True)
    path = os.path.join(results_root, "RESULTS.md")
    with open(path, "w") as f:
        f.write(text)
    if readme:
        update_readme(text, readme)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="*", help=f"one or more of {list(EXPERIMENTS) + ['pilot']} or config .py paths")
    p.add_argument("--arms", help="comma-separated subset of arms (one experiment only)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the experiment's SEEDS, or ARM_SEEDS per arm)")
    p.add_argument("--report", action="store_true", help="only rebuild tables, plots and RESULTS.md")
    p.add_argument("--rerun-stale", action="store_true", help="replace committed runs whose config changed")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, each pinned to its own core (default 1: one run on every core)")
    p.add_argument("--commit", action="store_true", help="git-commit each arm's logs when all its seeds are done")
    p.add_argument("--force", action="store_true",
                   help="also run experiments marked SKIP_UNRESOLVABLE (claims the power analysis cannot resolve)")
    args = p.parse_args(argv)
    try:
        if not args.report:
            if not args.experiment:
                p.error("name an experiment, or pass --report")
            if args.arms and len(args.experiment) > 1:
                p.error("--arms needs exactly one experiment")
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            arms = args.arms.split(",") if args.arms else None
            tasks, skipped = [], 0
            for name in args.experiment:
                mod = load_experiment(name)
                if getattr(mod, "SKIP_UNRESOLVABLE", False) and not args.force:
                    print(f"[sweep] {mod.EXPERIMENT}: not run: the power analysis finds its claims unresolvable at "
                          f"CPU scale (RESULTS.md 'Power'; SKIP_UNRESOLVABLE in its config); --force runs it")
                    continue
                planned = planned_arms(mod, args.force)
                skipped_arms = [a for a in mod.ARMS if a not in planned]
                if skipped_arms and not arms:
                    print(f"[sweep] {mod.EXPERIMENT}: arms {skipped_arms} not run: they serve only claims the power "
                          f"analysis finds unresolvable (UNRESOLVABLE_ARMS in its config); --force runs them")
                t, sk = plan_runs(mod, arms or planned, seeds, rerun_stale=args.rerun_stale)
                tasks += t
                skipped += len(sk)
            print(f"[sweep] {len(tasks)} run(s) to do, {skipped} already finished")
            if args.workers > 1 or args.commit:
                done = run_parallel(tasks, args.workers, commit=args.commit, timeout=args.timeout)
                if len(done) < len(tasks):
                    print(f"[sweep] {len(tasks) - len(done)} run(s) failed; rerun the same command to retry them",
                          file=sys.stderr)
            else:
                for task in tasks:
                    print(f"[{task['mod'].EXPERIMENT}] {task['arm']} seed {task['seed']}: "
                          f"{' '.join(task['cmd'][1:])}")
                    t0 = time.time()
                    subprocess_runner(task["cfg"], task["cmd"], args.timeout)
                    finish_run(task, time.time() - t0)
        mods = [load_experiment(e) for e in EXPERIMENTS]
        for name in args.experiment:
            if name.endswith(".py"):
                mods.append(load_experiment(name))
        readme = os.path.join(ROOT, "README.md") if all(m.EXPERIMENT in EXPERIMENTS for m in mods) else None
        print("wrote", write_results_md(mods, readme=readme))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
