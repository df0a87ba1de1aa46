"""Redundant-expert placement (V3 §3.4) on expert loads recorded by a real training run.

    python -m experiments.redundant_experts --metrics=runs/quickstart/metrics.jsonl --write

Reads the per-layer expert loads that the training loop logs (metrics.jsonl: ``expert_load`` [L, E] and
``mtp_expert_load`` [D, E], fractions of each layer's routed tokens in that step's batch) and, for every logged
step and every MoE layer, places the E experts plus R redundant copies on G devices with
``deepseek_jax.parallel.placement`` and reports the imbalance (max device load / mean) before (contiguous
expert-parallel layout, no copies) and after:

  in-sample      placed from a step's loads and measured on the same loads;
  next-log       placed from a step's loads and measured on the NEXT logged step's loads (the placement is always
                 computed from past statistics, as the paper's deployment does).

Default shape mirrors the paper's prefill unit, scaled down: 256 experts + 32 copies on 32 GPUs = 9 per GPU;
the quickstart model has 32 experts, so 32 + 4 copies on 4 devices = 9 per device. Also 8 devices + 8 copies.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

from deepseek_jax.provenance import machine, utc_now, write_result_files
from deepseek_jax.parallel import placement

SHAPES = ((4, 4), (8, 8))  # (devices, redundant copies)


def analyse(records, shapes=SHAPES):
    rows = []
    for i, rec in enumerate(records):
        layers = [("main", j, np.asarray(ld)) for j, ld in enumerate(rec["expert_load"])]
        layers += [("mtp", j, np.asarray(ld)) for j, ld in enumerate(rec.get("mtp_expert_load", []))]
        nxt = records[i + 1] if i + 1 < len(records) else None
        for kind, j, load in layers:
            for g, r in shapes:
                row = {"step": rec["step"], "layer": f"{kind}{j}", "devices": g, "redundant": r}
                row.update({f"in_{k}": v for k, v in placement.evaluate(load, load, r, g).items()})
                if nxt is not None:
                    key = "expert_load" if kind == "main" else "mtp_expert_load"
                    later = np.asarray(nxt[key][j])
                    row.update({f"next_{k}": v for k, v in placement.evaluate(load, later, r, g).items()})
                rows.append(row)
    return rows


def summarise(rows, shapes=SHAPES):
    out = {}
    for g, r in shapes:
        sel = [x for x in rows if x["devices"] == g and x["redundant"] == r]
        nxt = [x for x in sel if "next_after" in x]
        last_step = max(x["step"] for x in sel)
        last = [x for x in sel if x["step"] == last_step]
        out[f"G{g}_R{r}"] = {
            "in_sample_before": float(np.mean([x["in_before"] for x in sel])),
            "in_sample_after": float(np.mean([x["in_after"] for x in sel])),
            "next_log_before": float(np.mean([x["next_before"] for x in nxt])),
            "next_log_after": float(np.mean([x["next_after"] for x in nxt])),
            "last_step": last_step,
            "last_step_before": float(np.mean([x["in_before"] for x in last])),
            "last_step_after": float(np.mean([x["in_after"] for x in last])),
            "n_layer_steps": len(sel),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", default="runs/quickstart/metrics.jsonl")
    ap.add_argument("--write", action="store_true",
                    help="write experiments/results/redundant_experts.{json,md}")
    args = ap.parse_args(argv)
    with open(args.metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "expert_load" in r]
    if not records:
        raise ValueError(f"{args.metrics}: no records with expert_load")
    run_dir = os.path.dirname(os.path.abspath(args.metrics))
    run = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        run = {k: s.get(k) for k in ("code_version", "corpus_fingerprint", "step", "total_steps")}
        run["model_preset"] = s.get("config", {}).get("model.preset")
        run["machine"] = s.get("machine", {}).get("cpu")
    rows = analyse(records)
    summary = summarise(rows)
    E = len(records[0]["expert_load"][0])
    command = "python -m experiments.redundant_experts " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine_rec = {**machine(), "date": utc_now()}
    lines = [
        "# Redundant experts on measured loads", "",
        f"Command: `{command}`  ",
        f"Machine: {machine_rec['cpu']} ({machine_rec['cores']} cores), jax {machine_rec['jax']}, "
        f"{machine_rec['date']}.  ",
        f"Loads: `{args.metrics}` ({len(records)} logged steps, {E} experts per layer, main + MTP MoE layers), "
        f"from run {run}.", "",
        "Imbalance = max device load / mean device load, averaged over (logged step, layer). Before: expert e on "
        "device e // (E/G), no copies. After: greedy replication + packing (deepseek_jax/parallel/placement.py). "
        "In-sample: placed and measured on the same step's loads; next-log: placed on a step's loads, measured "
        "on the next logged step's.", "",
        "| devices G | copies R | slots/device | in-sample before | after | next-log before | after | "
        "last step before | after |", "|---|---|---|---|---|---|---|---|---|"]
    for (g, r) in SHAPES:
        s = summary[f"G{g}_R{r}"]
        lines.append(f"| {g} | {r} | {(E + r) // g} | {s['in_sample_before']:.3f} | {s['in_sample_after']:.3f} | "
                     f"{s['next_log_before']:.3f} | {s['next_log_after']:.3f} | {s['last_step_before']:.3f} | "
                     f"{s['last_step_after']:.3f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.write:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "redundant_experts")
        write_result_files(out, {"command": command, "machine": machine_rec, "run": run, "summary": summary,
                                 "rows": rows}, md)


if __name__ == "__main__":
    main()
