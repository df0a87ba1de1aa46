"""Kill -9 at random points, resume, compare with an uninterrupted run: the bitwise resume guarantee of
deepseek_jax/train/loop.py, exercised the way a user meets it (``python -m experiments.run`` subprocesses).

    python -m benchmarks.kill_resume [--trials 10] [--seed 0] [--write]

One uninterrupted run of benchmarks/kill_resume_config.py (12 steps, checkpoints every 3, validation every 4),
then ``--trials`` trials, each in a fresh directory: launch the same command, SIGKILL it at a random point
(after a uniformly drawn step k in [1, 11] is logged, plus a uniform delay within the step, which is slowed by
``loop.step_delay_s`` so the kill can land in compute, logging, validation or a checkpoint save), rerun the
same command to completion, and compare with the uninterrupted run:

  state       every leaf of the final checkpoint (params, Adam moments, router bias, step, skipped) bitwise,
              and the data iterator's state
  validation  validation.jsonl record for record (exactly equal floats)
  metrics     metrics.jsonl has each step exactly once, and every logged value except tokens_per_s (a timing)
              is equal

A persistent compilation cache (a temporary directory) is shared by the launches, so only the first compiles.
Not a CI test: about 2 launches per trial. ``--write``: benchmarks/results/kill_resume_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "benchmarks", "kill_resume_config.py")
TOTAL, STEP_DELAY_S = 12, 0.6


def _env(cache_dir):
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _cmd(out_dir, delay=0.0):
    return [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", f"--config.loop.out_dir={out_dir}",
            f"--config.loop.step_delay_s={delay}"]


def _run(out_dir, env, delay=0.0):
    r = subprocess.run(_cmd(out_dir, delay), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{out_dir}: exit {r.returncode}\n{r.stderr[-3000:]}")


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _logged_step(out_dir) -> int:
    p = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(p):
        return 0
    steps = []
    with open(p) as f:
        for line in f:
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass  # a line being written
    return max(steps, default=0)


def _kill_at(out_dir, env, step, frac, timeout=1800):
    """Launch, wait until ``step`` is logged, sleep ``frac`` of a step, SIGKILL. Returns the step logged then."""
    p = subprocess.Popen(_cmd(out_dir, STEP_DELAY_S), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while _logged_step(out_dir) < step:
        if p.poll() is not None:
            raise RuntimeError(f"{out_dir}: the run ended (exit {p.returncode}) before step {step}")
        if time.time() - t0 > timeout:
            p.kill()
            raise RuntimeError(f"{out_dir}: step {step} not reached in {timeout} s")
        time.sleep(0.05)
    time.sleep(frac * STEP_DELAY_S)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return _logged_step(out_dir)


def _final_state(out_dir):
    import jax

    from deepseek_jax.checkpoint import Checkpointer
    ck = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=1 << 30)
    try:
        state, data, _ = ck.restore_untargeted(TOTAL, only=())  # every checksum verified too
    finally:
        ck.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}, data


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _compare(ref_dir, ref_state, out_dir) -> dict:
    (ref, ref_data), (got, got_data) = ref_state, _final_state(out_dir)
    state_equal = ref.keys() == got.keys() and all(
        ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape and
        np.array_equal(_bits(ref[k]), _bits(got[k])) for k in ref)
    val_equal = _records(os.path.join(ref_dir, "validation.jsonl")) == _records(os.path.join(out_dir,
                                                                                             "validation.jsonl"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    rm, gm = _records(os.path.join(ref_dir, "metrics.jsonl")), _records(os.path.join(out_dir, "metrics.jsonl"))
    metrics_equal = [r["step"] for r in gm] == list(range(1, TOTAL + 1)) and strip(rm) == strip(gm)
    return {"state_equal": bool(state_equal), "data_state_equal": ref_data == got_data,
            "validation_equal": bool(val_equal), "metrics_equal": bool(metrics_equal), "leaves": len(ref)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    from deepseek_jax.provenance import git_rev, loadavg, machine as bench_machine, machine_lines, write_result_files

    rng = random.Random(args.seed)
    load_before = loadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        env = _env(os.path.join(tmp, "jax_cache"))
        ref = os.path.join(tmp, "uninterrupted")
        _run(ref, env)
        ref_state = _final_state(ref)
        trials = []
        for i in range(args.trials):
            out = os.path.join(tmp, f"trial{i}")
            step, frac = rng.randint(1, TOTAL - 1), rng.random()
            killed_after = _kill_at(out, env, step, frac)
            ckpts = sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit()) \
                if os.path.isdir(os.path.join(out, "checkpoints")) else []
            _run(out, env)
            res = {"trial": i, "kill_after_step": step, "kill_delay_s": round(frac * STEP_DELAY_S, 3),
                   "logged_at_kill": killed_after, "checkpoints_at_kill": ckpts, **_compare(ref, ref_state, out)}
            res["ok"] = all(res[k] for k in ("state_equal", "data_state_equal", "validation_equal",
                                             "metrics_equal"))
            trials.append(res)
            print(json.dumps(res), flush=True)
    ok = sum(t["ok"] for t in trials)
    machine = bench_machine(load_before, loadavg())
    cmd = "python -m benchmarks.kill_resume" + (f" --trials {args.trials}" if args.trials != 10 else "") + (
        f" --seed {args.seed}" if args.seed else "") + " --write"
    summary = (f"{ok}/{len(trials)} trials bitwise equal to the uninterrupted run (state, data state, validation, "
               f"metrics)")
    print(summary)
    if args.write:
        md = ["# Kill -9 and resume vs an uninterrupted run", "",
              f"Generated by `{cmd}` (benchmarks/kill_resume.py); code {git_rev(ROOT)}; "
              f"{round(time.time() - t_start)} s wall.", *machine_lines(machine), "", f"**{summary}.**", "",
              "| trial | killed after step (+ s) | checkpoints at the kill | state | validation | metrics |",
              "|---|---|---|---|---|---|"]
        for t in trials:
            yes = lambda b: "equal" if b else "DIFFERENT"
            md.append(f"| {t['trial']} | {t['kill_after_step']} (+{t['kill_delay_s']}) | {t['checkpoints_at_kill']} "
                      f"| {yes(t['state_equal'] and t['data_state_equal'])} | {yes(t['validation_equal'])} "
                      f"| {yes(t['metrics_equal'])} |")
        write_result_files(os.path.join(ROOT, "benchmarks", "results", "kill_resume_cpu"),
                           {"command": cmd, "trials": trials, "ok": ok, "machine": machine,
                            "code_version": git_rev(ROOT)}, "\n".join(md) + "\n")
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
