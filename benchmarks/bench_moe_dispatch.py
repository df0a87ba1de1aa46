"""Routed-expert FFN (DeepSeekMoE dispatch) on CPU: each dispatch's time over one dense matmul of equal FLOPs.

For T tokens, hidden d, expert width F, E experts, top-K routing (fp32), times the jit-compiled routed FFN
sum_k g_k * SwiGLU_{e_k}(x) (`deepseek_jax.layers.moe_dispatch.routed_experts`) for every dispatch, forward only and
forward+backward (grad wrt x and the three expert weight stacks), and divides by the time of ONE matmul

    jnp.dot([N*K, d], [d, 3F])      2 * N*K * d * 3F FLOPs == the routed FFN's 2 * N*K * d*F * 3 (gate, up, down)

so ratio 1.0 means "as fast as one big GEMM doing the routed FLOPs". Forward+backward does 3x those FLOPs, so
its floor is ~3.0. Timings: AOT-compiled (compile excluded), warmed up, median over reps of block_until_ready
wall time; each rep is paired with a baseline matmul rep run just before it (the machine may be shared: pairing
keeps the ratio honest when the load changes; the load average is recorded). Dispatches slower than a few seconds
a call (dense, ragged: both compute all E experts for every row on CPU) get `--slow-reps` reps and no extra
warmup call.

Routers: `imbalanced` = top-K of sigmoid(N(0,1) logits + a per-expert N(0, bias_std) offset) (max/mean load ~2.5
at the defaults, some experts nearly idle); `uniform` = token n takes experts (n*K + k) mod E, every expert gets
exactly N*K/E rows. Each dispatch's output and grads are checked against `dense` (max |diff| / max |dense|).

    python -m benchmarks.bench_moe_dispatch                 # print the table
    python -m benchmarks.bench_moe_dispatch --write         # also write experiments/results/moe_dispatch_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np



from deepseek_jax import config as ds_config
from deepseek_jax.provenance import command_line, git_rev, machine, utc_now, write_result_files
from deepseek_jax.ops import moe_dispatch

SLOW = ("dense", "ragged")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="N = tokens")
    p.add_argument("--d", type=int, default=256, help="hidden size")
    p.add_argument("--ffn", type=int, default=512, help="expert width F")
    p.add_argument("--experts", type=int, default=64, help="E")
    p.add_argument("--topk", type=int, default=6, help="K")
    p.add_argument("--cases", default="imbalanced,uniform")
    p.add_argument("--dispatches", default="bucket_tiles,sorted_tiles,dense,ragged")
    p.add_argument("--tiles", default="64,128,256", help="sorted_tiles tile sizes")
    p.add_argument("--slow-cases", default="imbalanced",
                   help="cases in which the slow dispatches (dense, ragged) are timed; elsewhere dense only "
                        "gives the reference forward for the error check")
    p.add_argument("--no-grad", default="", help="comma list of dispatches whose forward+backward is not timed")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--slow-reps", type=int, default=1)
    p.add_argument("--bias-std", type=float, default=0.25, help="per-expert logit offset std (imbalanced case)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the .md and .json results")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "moe_dispatch_cpu"),
                   help="results path without extension (with --write)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
def machine_info():
    return {
        "date_utc": utc_now(), "command": command_line(), "git": git_rev(dirty=True), **machine(),
        "threads_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "moe_tile_size_default": ds_config.ModelConfig.__dataclass_fields__["moe_tile_size"].default,
        "loadavg_start": os.getloadavg(),
    }


def make_routes(case, N, E, K, key, bias_std):
    if case == "uniform":
        idx = (jnp.arange(N)[:, None] * K + jnp.arange(K)[None, :]) % E
        w = jnp.full((N, K), 1.0 / K, jnp.float32)
        return idx.astype(jnp.int32), w
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (N, E)) + bias_std * jax.random.normal(k2, (E,))
    s = jax.nn.sigmoid(logits)
    w, idx = jax.lax.top_k(s, K)
    return idx.astype(jnp.int32), w / w.sum(-1, keepdims=True)


def aot(fn, *args):
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return c, time.perf_counter() - t0


def run_once(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def timed_pairs(fn, args, mm, mm_args, reps, warmup):
    """[(t_fn, t_mm)] with one baseline rep run right before each fn rep."""
    for _ in range(warmup):
        run_once(fn, args)
    pairs = []
    for _ in range(reps):
        t_mm = run_once(mm, mm_args)
        pairs.append((run_once(fn, args), t_mm))
    return pairs


def first_call(fn, args, mm, mm_args, slow):
    """The first (post-compile) call, whose result feeds the error check. For the slow dispatches it is also the
    timed rep (paired with the median of 3 baseline reps), so that they run once, not twice."""
    if not slow:
        return jax.block_until_ready(fn(*args)), []
    t_mm = statistics.median(run_once(mm, mm_args) for _ in range(3))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, [(time.perf_counter() - t0, t_mm)]


def summarize(pairs):
    t = [a for a, _ in pairs]
    m = [b for _, b in pairs]
    return {"ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t),
            "mm_ms_median": 1e3 * statistics.median(m), "reps": len(t),
            "ratio": statistics.median(a / b for a, b in pairs),  # median of the paired ratios
            "ratio_of_medians": statistics.median(t) / statistics.median(m),
            "ratio_of_mins": min(t) / min(m)}


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    a = parse_args(argv)
    N, d, F, E, K = a.tokens, a.d, a.ffn, a.experts, a.topk
    NK = N * K
    info = machine_info()
    info.update({"shape": {"N": N, "d": d, "F": F, "E": E, "K": K, "dtype": "float32"},
                 "routed_flops_fwd": 2 * NK * d * F * 3,
                 "baseline": f"jnp.dot([N*K, d] = [{NK}, {d}], [d, 3F] = [{d}, {3 * F}]) fp32"})
    keys = jax.random.split(jax.random.PRNGKey(a.seed), 8)
    x = jax.random.normal(keys[0], (N, d), jnp.float32)
    sc = 1.0 / np.sqrt(d)
    wg = sc * jax.random.normal(keys[1], (E, d, F), jnp.float32)
    wu = sc * jax.random.normal(keys[2], (E, d, F), jnp.float32)
    wd = (1.0 / np.sqrt(F)) * jax.random.normal(keys[3], (E, F, d), jnp.float32)
    ct = jax.random.normal(keys[4], (N, d), jnp.float32)  # fixed output cotangent

    A = jax.random.normal(keys[5], (NK, d), jnp.float32)
    B = jax.random.normal(keys[6], (d, 3 * F), jnp.float32)
    mm, _ = aot(jnp.dot, A, B)
    for _ in range(3):
        run_once(mm, (A, B))
    mm_t = statistics.median(run_once(mm, (A, B)) for _ in range(5))
    info["baseline_ms_calibration"] = 1e3 * mm_t
    info["baseline_gflops"] = info["routed_flops_fwd"] / mm_t / 1e9
    alts = {}
    for m_, k_, n_ in [(NK, d, 3 * F), (3 * NK, d, F), (NK, 3 * d, F), (N, d, 3 * K * F)]:
        assert 2 * m_ * k_ * n_ == info["routed_flops_fwd"]
        P_ = jax.random.normal(keys[5], (m_, k_), jnp.float32)
        Q_ = jax.random.normal(keys[6], (k_, n_), jnp.float32)
        c_, _ = aot(jnp.dot, P_, Q_)
        run_once(c_, (P_, Q_))
        alts[f"[{m_},{k_}]x[{k_},{n_}]"] = 1e3 * statistics.median(run_once(c_, (P_, Q_)) for _ in range(3))
        del P_, Q_
    info["equal_flop_gemm_ms"] = alts
    print(f"# baseline {info['baseline']}: {1e3 * mm_t:.1f} ms ({info['baseline_gflops']:.0f} GFLOP/s)", flush=True)

    dispatches = [s for s in a.dispatches.split(",") if s]
    tiles = [int(t) for t in a.tiles.split(",") if t]
    no_grad = set(s for s in a.no_grad.split(",") if s)
    slow_cases = set(s for s in a.slow_cases.split(",") if s)
    rows = []
    for case in [c for c in a.cases.split(",") if c]:
        idx, w = make_routes(case, N, E, K, keys[7], a.bias_std)
        load = np.bincount(np.asarray(idx).reshape(-1), minlength=E)
        load_info = {"max_over_mean": float(load.max() / load.mean()), "min_over_mean": float(load.min() / load.mean()),
                     "empty_experts": int((load == 0).sum())}
        print(f"# case {case}: load max/mean {load_info['max_over_mean']:.2f}, min/mean "
              f"{load_info['min_over_mean']:.2f}, empty {load_info['empty_experts']}", flush=True)
        args = (x, idx, w, wg, wu, wd)

        def fwd_fn(name, tile):
            return lambda x, i, w, g, u, dn: moe_dispatch.routed_experts(x, i, w, g, u, dn, name, tile)

        def grad_fn(name, tile):
            f = fwd_fn(name, tile)
            return jax.grad(lambda x, i, w, g, u, dn, ct: jnp.vdot(f(x, i, w, g, u, dn), ct), argnums=(0, 3, 4, 5))

        ref_y = ref_g = None
        variants = []
        for name in dispatches:
            if name == "sorted_tiles":
                variants += [(name, t) for t in tiles]
            elif name == "bucket_tiles":  # the overflow's tile is min(moe_tile_size, 32) whatever the tile
                variants.append((name, ds_config.ModelConfig.__dataclass_fields__["moe_tile_size"].default))
            elif name in SLOW and case not in slow_cases:
                continue
            else:
                variants.append((name, 0))
        if "dense" in dispatches and case not in slow_cases:  # untimed reference for the error check
            f, _ = aot(fwd_fn("dense", 0), *args)
            ref_y = f(*args)
        # dense first so the others can be checked against it
        variants.sort(key=lambda v: v[0] != "dense")
        for name, tile in variants:
            slow = name in SLOW
            reps, warm = (a.slow_reps, 0) if slow else (a.reps, 2)
            row = {"case": case, "dispatch": name, "tile": tile or None, "load": load_info}
            if name == "sorted_tiles":
                _, _, _, n_used = moe_dispatch._tile_layout(idx, E, tile)
                row["rows_computed_over_routed"] = int(n_used) * tile / NK
            if name == "bucket_tiles":  # the buckets' E*C rows (filled or not) plus the overflow tiles'
                C, o_tile = moe_dispatch.bucket_capacity(NK, E), min(tile, moe_dispatch.OVERFLOW_TILE)
                o_used = moe_dispatch._bucket_layout(idx, E, C, o_tile)[-1]
                row["rows_computed_over_routed"] = (E * C + int(o_used) * o_tile) / NK
            f, c_s = aot(fwd_fn(name, tile), *args)
            y, pairs = first_call(f, args, mm, (A, B), slow)
            if name == "dense":
                ref_y = y
            row["fwd"] = summarize(pairs + timed_pairs(f, args, mm, (A, B), reps - len(pairs), warm))
            row["fwd"]["compile_s"] = c_s
            row["fwd_rel_err_vs_dense"] = None if ref_y is None else rel_err(y, ref_y)
            if name not in no_grad:
                gargs = args + (ct,)
                g, c_s = aot(grad_fn(name, tile), *gargs)
                gv, pairs = first_call(g, gargs, mm, (A, B), slow)
                if name == "dense":
                    ref_g = gv
                row["fwdbwd"] = summarize(pairs + timed_pairs(g, gargs, mm, (A, B), reps - len(pairs), warm))
                row["fwdbwd"]["compile_s"] = c_s
                row["grad_rel_err_vs_dense"] = (None if ref_g is None else
                                                max(rel_err(p, q) for p, q in zip(gv, ref_g)))
            rows.append(row)
            fb = row.get("fwdbwd")
            print(f"  {case:10s} {name:12s} tile={tile or '-':>4} fwd {row['fwd']['ms_median']:9.1f} ms "
                  f"x{row['fwd']['ratio']:.2f}" + (f"  fwd+bwd {fb['ms_median']:9.1f} ms x{fb['ratio']:.2f}"
                                                     if fb else ""), flush=True)
    info["loadavg_end"] = os.getloadavg()
    md = render(info, rows)
    print(md)
    if a.write:
        write_result_files(a.out, {"info": info, "rows": rows}, md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def render(info, rows):
    s = info["shape"]
    out = [
        "# Routed-expert FFN dispatch on CPU, relative to one dense matmul of equal FLOPs",
        "",
        f"Generated by `{info['command']}` (git {info['git']}) on {info['date_utc']}.",
        "",
        f"- shape: N={s['N']} tokens, d={s['d']}, F={s['F']}, E={s['E']}, top-K={s['K']}, {s['dtype']}; "
        f"routed forward FLOPs 2*N*K*d*F*3 = {info['routed_flops_fwd'] / 1e9:.2f} GFLOP",
        f"- baseline: ONE `{info['baseline']}` (same FLOPs), {info['baseline_ms_calibration']:.1f} ms "
        f"= {info['baseline_gflops']:.0f} GFLOP/s at calibration; other equal-FLOP GEMM shapes (ms, 3 reps): "
        + ", ".join(f"{k} {v:.0f}" for k, v in info["equal_flop_gemm_ms"].items()),
        f"- machine: {info['cpu']}, {info['threads_available']} threads available "
        f"(os.cpu_count={info['cores']}), backend {info['backend']}; "
        f"load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}",
        f"- jax {info['jax']}, jaxlib {info['jaxlib']}, python {info['python']}, XLA_FLAGS='{info['XLA_FLAGS']}', "
        f"config default moe_tile_size={info['moe_tile_size_default']}",
        "",
        "ratio = median over reps of (dispatch time / time of the baseline rep run just before it), so load changes "
        "on a shared machine cancel; in brackets min(dispatch) / min(baseline). Slow dispatches: one post-compile "
        "call over the median of 3 baseline reps. fwd+bwd = grad wrt x, W_gate, W_up, W_down (3x the forward "
        "FLOPs, so ~3.0 is the floor). "
        "`rows` = rows pushed through the expert matmuls / routed rows N*K (tile padding; bucket_tiles: its E*C "
        "bucket rows, filled or not, plus its overflow tiles). err = max|diff| / "
        "max|dense| of the output (fwd) and of each gradient (fwd+bwd).",
        "",
        "| case | dispatch | tile | rows | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | reps | fwd err "
        "| grad err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fb = r.get("fwdbwd")
        out.append(
            f"| {r['case']} | {r['dispatch']} | {r['tile'] or '-'} | "
            f"{_fmt(r.get('rows_computed_over_routed'), '.2f') if r.get('rows_computed_over_routed') else '-'} | "
            f"{r['fwd']['ms_median']:.1f} | **{r['fwd']['ratio']:.2f}** ({r['fwd']['ratio_of_mins']:.2f}) | "
            f"{_fmt(fb and fb['ms_median'], '.1f')} | "
            f"{'n/a' if not fb else format(fb['ratio'], '.2f') + ' (' + format(fb['ratio_of_mins'], '.2f') + ')'} | "
            f"{r['fwd']['reps']}{'/' + str(fb['reps']) if fb else ''} | "
            + ("ref | ref |" if r["dispatch"] == "dense" else
               f"{_fmt(r.get('fwd_rel_err_vs_dense'), '.1e')} | {_fmt(r.get('grad_rel_err_vs_dense'), '.1e')} |"))
    loads = {r["case"]: r["load"] for r in rows}
    out += ["", "Router loads: " + "; ".join(
        f"{c}: max/mean {ld['max_over_mean']:.2f}, min/mean {ld['min_over_mean']:.2f}, {ld['empty_experts']} empty"
        for c, ld in loads.items()), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
