"""End-to-end wall time of training runs: the quickstart and a 300-step run of the experiments' base config.

Each run is ``python -m experiments.run --config=...`` in a fresh subprocess with a fresh output directory, timed
from process start to exit, with JAX's persistent compilation cache empty ("cold": what a first run on a new
machine pays) and then filled by that run ("warm": every later run of the same shapes). Steps/s is the median of
the driver's logged ``tokens_per_s`` over the logged intervals, so it excludes compilation, evaluation and
checkpoints; the rest of the wall time is the driver's overhead (start-up, data, compile, evaluation,
checkpoints, plots, sample).

    python -m benchmarks.run_wall [--write] [--repo DIR]    # --repo: time another checkout (e.g. an older rev)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from deepseek_jax.provenance import loadavg  # noqa: E402  (imports jax; this parent never computes)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HERE_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = (
    ("quickstart", "experiments/configs/quickstart.py", []),
    # 300 steps (the base config itself now runs 1,500): the schedule's step-valued fields follow total_steps
    ("base config, 300 steps", "experiments/configs/balancing.py:aux_free",
     ["--config.loop.progress=False", "--config.train.total_steps=300"]),
)


def time_run(repo: str, config: str, extra: list, cache_dir: str) -> dict:
    out = tempfile.mkdtemp(prefix="run_wall_")
    shutil.rmtree(out)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, PYTHONPATH=repo)
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}", f"--config.loop.out_dir={out}",
           "--config.loop.progress=False", *extra]
    load = loadavg()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"run_wall: {config} in {repo} failed (exit {r.returncode}): {r.stderr[-1500:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    steps = summary["step"]
    tok = [rec["tokens_per_s"] for rec in recs[1:]]  # the first interval holds the first step's compile
    tokens_per_step = recs[-1]["tokens"] if recs else float("nan")
    sps = statistics.median(tok) / tokens_per_step if tok else float("nan")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "steps": steps, "steps_per_s": sps, "train_s": steps / sps,
            "overhead_s": wall - steps / sps, "val_loss": summary["validation"]["loss"], "load_before": load,
            "load_after": loadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=HERE_REPO, help="checkout whose experiments.run is timed")
    ap.add_argument("--label", default=None, help="name of this checkout in the output (default: its git rev)")
    ap.add_argument("--phases", default="cold,warm", help="cold / warm / both (comma list)")
    ap.add_argument("--write", action="store_true", help="append to benchmarks/results/run_wall_cpu.{md,json}")
    args = ap.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=args.repo,
                           capture_output=True, text=True).stdout.strip()
    label = args.label or rev + ("+dirty" if dirty else "")
    rows = []
    for name, config, extra in RUNS:
        cache = tempfile.mkdtemp(prefix="run_wall_cache_")
        try:
            for phase in args.phases.split(","):
                res = time_run(args.repo, config, extra, cache)
                res.update(run=name, cache=phase, code=label)
                rows.append(res)
                print(f"{label} | {name} | {phase} cache | wall {res['wall_s']:.1f} s | {res['steps']} steps at "
                      f"{res['steps_per_s']:.2f} steps/s ({res['train_s']:.1f} s) | overhead {res['overhead_s']:.1f} s"
                      f" | val loss {res['val_loss']:.3f} | load {res['load_before']} -> {res['load_after']}",
                      flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    if args.write:
        from deepseek_jax.provenance import machine, machine_lines
        stem = os.path.join(RESULTS, "run_wall_cpu")
        data = {"runs": []}
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                data = json.load(f)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rec = machine(rows[0]["load_before"], rows[-1]["load_after"])
        data["runs"] = [r for r in data["runs"] if r["code"] != label] + [dict(r, date=date) for r in rows]
        data["machine"] = rec
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1)
        md = ["# Training runs end to end on CPU (wall time, compilation included)", "",
              "Generated by `python -m benchmarks.run_wall --write [--repo DIR --label NAME]` (one block of rows per "
              "checkout). Each run is `python -m experiments.run` in a fresh process and output directory; "
              "'cold' = empty JAX compilation cache, 'warm' = the cache the cold run filled. steps/s = median of the "
              "driver's logged tokens/s over the logged intervals; overhead = wall - steps / (steps/s).", "",
              *machine_lines(rec), "",
              "| code | run | cache | wall s | steps | steps/s | training s | overhead s | val loss | load before "
              "-> after | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["runs"]:
            md.append(f"| {r['code']} | {r['run']} | {r['cache']} | {r['wall_s']:.1f} | {r['steps']} | "
                      f"{r['steps_per_s']:.2f} | {r['train_s']:.1f} | {r['overhead_s']:.1f} | {r['val_loss']:.3f} | "
                      f"{r['load_before'][0]} -> {r['load_after'][0]} | {r['date']} |")
        with open(stem + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
    return rows


if __name__ == "__main__":
    main()
