"""FP8 vs BF16 training: the relative loss gap over the run (V3 App. B.1: < 0.25%).

The runs come from the sweep over experiments/configs/fp8.py (the CPU base model, 300 steps, compute dtype
bfloat16 in both arms; the "fp8" arm adds ModelConfig.fp8 = True, i.e. E4M3 block-scaled GEMMs through the XLA
reference path):

    python -m experiments.sweep fp8 --seeds 0          # then --seeds 1,2; logs land in experiments/results/fp8/runs/
    python -m experiments.run --config=experiments/configs/fp8.py:bf16,seed=0 --config.loop.seed=100 \
        --config.loop.out_dir=runs/fp8_control/bf16_init100_data0 --config.loop.progress=False   # noise control
    python experiments/fp8_train_gap.py                # this script: gap table and plot from those logs

The control is the BF16 arm again with seed 0's data order but another initialisation (loop.seed 100): its gap to
BF16 seed 0 is what run-to-run noise alone gives at this scale. This script copies its small logs to
experiments/results/fp8/control/.

For every seed run in both arms (same data order and init: the seed sets both), per logged step:
gap = (CE_fp8 - CE_bf16) / CE_bf16 on the training batch, and at each validation point the same for the validation
loss. Reports per-seed and mean values, the mean |gap| over the second half of the run, and the final validation
gap against the paper's 0.25%. Writes experiments/results/fp8/train_gap.{json,md,png}.
"""

from __future__ import annotations

import glob
import json
import os
import sys


import numpy as np  # noqa: E402

from experiments.fp8_common import RESULTS, provenance, provenance_md, write_json, write_text  # noqa: E402

PAPER_TOL = 0.0025


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(arm: str):
    runs = {}
    for d in sorted(glob.glob(os.path.join(RESULTS, "runs", arm, "seed*"))):
        if not os.path.exists(os.path.join(d, "summary.json")):
            continue  # unfinished
        seed = int(os.path.basename(d)[4:])
        train = {r["step"]: r["ce"] for r in _jsonl(os.path.join(d, "metrics.jsonl")) if "ce" in r}
        val = {r["step"]: r["loss"] for r in _jsonl(os.path.join(d, "validation.jsonl")) if "loss" in r}
        sweep = os.path.join(d, "sweep.json")
        info = json.load(open(sweep)) if os.path.exists(sweep) else {}
        runs[seed] = dict(train=train, val=val, wall_s=info.get("wall_s"), command=info.get("command"))
    return runs


CONTROL_RUN = os.path.join(os.path.dirname(RESULTS), "..", "..", "runs", "fp8_control", "bf16_init100_data0")
CONTROL = os.path.join(RESULTS, "control", "bf16_init100_data0")


def load_control():
    """The noise-control run's logs (copied from runs/ into results on first use), or None."""
    import shutil
    if os.path.exists(os.path.join(CONTROL_RUN, "summary.json")):
        os.makedirs(CONTROL, exist_ok=True)
        for f in ("config.json", "metrics.jsonl", "validation.jsonl", "summary.json"):
            if os.path.exists(os.path.join(CONTROL_RUN, f)):
                shutil.copy(os.path.join(CONTROL_RUN, f), os.path.join(CONTROL, f))
    if not os.path.exists(os.path.join(CONTROL, "summary.json")):
        return None
    train = {r["step"]: r["ce"] for r in _jsonl(os.path.join(CONTROL, "metrics.jsonl")) if "ce" in r}
    val = {r["step"]: r["loss"] for r in _jsonl(os.path.join(CONTROL, "validation.jsonl")) if "loss" in r}
    return dict(train=train, val=val)


def main():
    bf, f8 = load("bf16"), load("fp8")
    seeds = sorted(set(bf) & set(f8))
    if not seeds:
        sys.exit(f"fp8_train_gap: no seed finished in both arms under {RESULTS}/runs/; run the sweep first "
                 "(see the docstring)")
    per_seed = {}
    for s in seeds:
        steps = sorted(set(bf[s]["train"]) & set(f8[s]["train"]))
        gap = np.array([(f8[s]["train"][t] - bf[s]["train"][t]) / bf[s]["train"][t] for t in steps])
        vsteps = sorted(set(bf[s]["val"]) & set(f8[s]["val"]))
        vgap = [(f8[s]["val"][t] - bf[s]["val"][t]) / bf[s]["val"][t] for t in vsteps]
        half = np.asarray(steps) > steps[-1] / 2
        per_seed[s] = dict(steps=steps, train_gap=gap.tolist(), val_steps=vsteps, val_gap=vgap,
                           val_loss_bf16=[bf[s]["val"][t] for t in vsteps],
                           val_loss_fp8=[f8[s]["val"][t] for t in vsteps],
                           mean_abs_train_gap_second_half=float(np.abs(gap[half]).mean()),
                           final_val_gap=vgap[-1] if vgap else None,
                           wall_s=dict(bf16=bf[s]["wall_s"], fp8=f8[s]["wall_s"]),
                           commands=dict(bf16=bf[s]["command"], fp8=f8[s]["command"]))
    finals = np.array([per_seed[s]["final_val_gap"] for s in seeds], dtype=float)
    halves = np.array([per_seed[s]["mean_abs_train_gap_second_half"] for s in seeds])
    summary = dict(seeds=seeds, final_val_gap_mean=float(finals.mean()),
                   final_val_gap_std=float(finals.std(ddof=1)) if len(seeds) > 1 else None,
                   mean_abs_train_gap_second_half=float(halves.mean()), paper_tol=PAPER_TOL,
                   within_paper_tol=bool(abs(finals.mean()) < PAPER_TOL))
    ctrl = load_control()
    control = None
    if ctrl is not None and 0 in bf:
        steps = sorted(set(ctrl["train"]) & set(bf[0]["train"]))
        cgap = np.array([(ctrl["train"][t] - bf[0]["train"][t]) / bf[0]["train"][t] for t in steps])
        vsteps = sorted(set(ctrl["val"]) & set(bf[0]["val"]))
        cv = [(ctrl["val"][t] - bf[0]["val"][t]) / bf[0]["val"][t] for t in vsteps]
        half = np.asarray(steps) > steps[-1] / 2
        control = dict(steps=steps, train_gap=cgap.tolist(), val_steps=vsteps, val_gap=cv,
                       final_val_gap=cv[-1] if cv else None,
                       mean_abs_train_gap_second_half=float(np.abs(cgap[half]).mean()))
        summary["control_final_val_gap"] = control["final_val_gap"]
        summary["control_mean_abs_train_gap_second_half"] = control["mean_abs_train_gap_second_half"]
    prov = provenance()
    write_json("train_gap.json", dict(description=__doc__.split("\n\n")[1].strip(), summary=summary,
                                      per_seed=per_seed, control=control, provenance=prov))

    std = summary["final_val_gap_std"]
    lines = ["# FP8 vs BF16 training: relative loss gap (V3 App. B.1: < 0.25%)\n", provenance_md(prov),
             "\nRuns: `python -m experiments.sweep fp8 --seeds ...` (experiments/configs/fp8.py: the CPU base model, "
             "300 steps of 8x128 byte tokens, bf16 compute in both arms; FP8 arm: E4M3 1x128/128x128 block-scaled "
             "GEMMs, XLA reference path). Gap = (loss_fp8 - loss_bf16) / loss_bf16, paired by seed.\n",
             "| seed | final val loss bf16 | final val loss fp8 | final val gap | mean abs train-CE gap, 2nd half | "
             "wall s bf16 / fp8 |", "|---|---|---|---|---|---|"]
    for s in seeds:
        p = per_seed[s]
        w = p["wall_s"]
        lines.append(f"| {s} | {p['val_loss_bf16'][-1]:.4f} | {p['val_loss_fp8'][-1]:.4f} | "
                     f"{p['final_val_gap']:+.3%} | "
                     f"{p['mean_abs_train_gap_second_half']:.3%} | {w['bf16'] or float('nan'):.0f} / "
                     f"{w['fp8'] or float('nan'):.0f} |")
    lines.append(f"\nMean final validation gap over {len(seeds)} seed(s): {summary['final_val_gap_mean']:+.3%}"
                 + (f" (std {std:.3%})" if std is not None else "")
                 + f"; paper: < {PAPER_TOL:.2%}. Mean |train-CE gap| over the second half: "
                 f"{summary['mean_abs_train_gap_second_half']:.3%} (single batches: includes batch noise of the "
                 "two arms' different parameters).")
    if control is not None:
        lines.append(f"\nNoise control (BF16, seed 0's data, another init): final validation gap to BF16 seed 0 "
                     f"{control['final_val_gap']:+.3%}, mean |train-CE gap| over the second half "
                     f"{control['mean_abs_train_gap_second_half']:.3%}: the mean FP8 final gap is "
                     + ("within" if abs(summary["final_val_gap_mean"]) <= abs(control["final_val_gap"]) else
                        "larger than") + " this one-run estimate of run-to-run noise.")
    write_text("train_gap.md", "\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for s in seeds:
        p = per_seed[s]
        ax1.plot(p["steps"], [bf[s]["train"][t] for t in p["steps"]], color="tab:blue", alpha=0.6,
                 label="bf16" if s == seeds[0] else None)
        ax1.plot(p["steps"], [f8[s]["train"][t] for t in p["steps"]], color="tab:red", alpha=0.6, ls="--",
                 label="fp8" if s == seeds[0] else None)
        ax2.plot(p["steps"], 100 * np.asarray(p["train_gap"]), color="gray", alpha=0.5,
                 label="train CE gap (per seed)" if s == seeds[0] else None)
        ax2.plot(p["val_steps"], 100 * np.asarray(p["val_gap"]), "ko", label="val loss gap" if s == seeds[0] else None)
    if control is not None:
        ax2.plot(control["steps"], 100 * np.asarray(control["train_gap"]), color="tab:purple", alpha=0.6,
                 label="control: bf16 other init vs bf16 (seed 0)")
        ax2.plot(control["val_steps"], 100 * np.asarray(control["val_gap"]), "s", color="tab:purple")
    ax2.axhspan(-100 * PAPER_TOL, 100 * PAPER_TOL, color="tab:green", alpha=0.2, label="paper: < 0.25%")
    ax1.set_ylabel("training CE")
    ax1.legend()
    ax2.set_ylabel("(fp8 - bf16) / bf16  [%]")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    ax1.set_title(f"FP8 vs BF16, CPU base model, {len(seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "train_gap.png"), dpi=120)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
