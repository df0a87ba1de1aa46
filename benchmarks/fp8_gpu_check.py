"""Compile the FP8 GEMM kernels on a GPU, check them against interpret mode, and time them at V3's GEMM shapes.

    python -m benchmarks.fp8_gpu_check [--kernels triton,mosaic_gpu] [--iters 20] [--skip-bench]

One command, sized for <= 8 minutes on one Hopper GPU. Without a GPU it prints one line and exits with status 2
(nothing is written). For each kernel of ops/fp8_pallas.py that compiles for GPUs (docs/fp8.md "Kernels"):
  1. compile ``fp8_gemm(kernel=...)`` for accum="fp32" and (triton only) accum="limited" with 14 bits, promotion
     every 128 and never;
  2. check it against ``kernel="interpret"`` (the Pallas interpreter) on the same operands, at a small shape and at
     decode M = 8: max |diff| / max |ref| < 1e-5 (limited: 1e-4, a 32-wide dot's internal summation order can move
     a truncation point by one bit);
  3. time it (median of --iters calls) at M = 4096 and (N, K) in V3's shapes plus 4096x7168, reporting
     TFLOPS = 2MNK / t beside XLA's BF16 matmul and XLA's own FP8 dot_general (per-tensor, no block scales) at
     the same shape, and DeepGEMM's published anchor: 1304 TFLOPS at M=N=4096, K=7168 on H800.
A kernel that fails to compile is recorded with its error and the run goes on; the exit status is 1 when no
kernel passes the check. Writes benchmarks/results/fp8_gpu_check.{json,md} with the device name, jax/jaxlib
versions and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_calls
from deepseek_jax.ops import fp8, fp8_pallas
from deepseek_jax.provenance import machine as bench_machine, machine_lines, write_result_files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
M_BENCH = 4096
SHAPES_NK = [(4096, 7168), (7168, 2048), (2048, 7168), (24576, 1536)]  # (4096, 7168): DeepGEMM's anchor shape
DEEPGEMM = {"M": 4096, "N": 4096, "K": 7168, "tflops": 1304, "device": "H800", "source": "DeepGEMM README table"}
CASES = {"triton": [dict(accum="fp32"), dict(accum="limited", mantissa_bits=14, promote_every=128),
                    dict(accum="limited", mantissa_bits=14, promote_every=None)],
         "mosaic_gpu": [dict(accum="fp32")]}
CHECK_SHAPES = [(256, 512, 384), (8, 256, 384), (200, 136, 200)]  # small, decode, not multiples of the blocks


def operands(M, N, K, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a_q, a_s = fp8.quantize_1x128(jax.random.normal(k1, (M, K), jnp.float32))
    b_q, b_s = fp8.quantize_128x128(jax.random.normal(k2, (N, K), jnp.float32) * 0.05)
    return a_q, a_s, b_q, b_s


def bench(fn, *args, iters=20):
    return float(np.median(time_calls(lambda: fn(*args), iters, warmup=3)))


def tflops(M, N, K, t):
    return 2 * M * N * K / t / 1e12


def check_kernel(kernel, rec, iters, skip_bench):
    ok = True
    for case in CASES[kernel]:
        for M, N, K in CHECK_SHAPES:
            entry = dict(case, M=M, N=N, K=K)
            ops = operands(M, N, K, seed=M)
            try:
                ref = jax.jit(lambda *x, c=case: fp8_pallas.fp8_gemm(*x, kernel="interpret", **c))(*ops)
                out = jax.jit(lambda *x, c=case: fp8_pallas.fp8_gemm(*x, kernel=kernel, interpret=False, **c))(*ops)
                err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
                bound = 1e-5 if case["accum"] == "fp32" else 1e-4
                entry.update(max_rel_diff_vs_interpret=err, bound=bound, passed=err < bound)
                ok &= err < bound
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                entry.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
                ok = False
            rec["equality"].append(entry)
            print(kernel, {k: entry.get(k) for k in ("accum", "promote_every", "M", "N", "K")},
                  entry.get("max_rel_diff_vs_interpret", entry.get("error", "")[:300]), flush=True)
    rec["passed"] = ok
    if ok and not skip_bench:
        fn = jax.jit(lambda *x: fp8_pallas.fp8_gemm(*x, kernel=kernel, interpret=False))
        for N, K in SHAPES_NK:
            t = bench(fn, *operands(M_BENCH, N, K), iters=iters)
            rec["bench"].append(dict(M=M_BENCH, N=N, K=K, seconds=t, tflops=tflops(M_BENCH, N, K, t)))
            print(kernel, rec["bench"][-1], flush=True)
    return ok


def bench_xla(iters):
    nt = (((1,), (1,)), ((), ()))
    bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.bfloat16))
    f8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.float32))
    rows = {}
    for N, K in SHAPES_NK:
        k1, k2 = jax.random.split(jax.random.PRNGKey(1))
        a = jax.random.normal(k1, (M_BENCH, K), jnp.bfloat16)
        b = jax.random.normal(k2, (N, K), jnp.bfloat16)
        row = dict(M=M_BENCH, N=N, K=K)
        t = bench(bf16, a, b, iters=iters)
        row.update(bf16_seconds=t, bf16_tflops=tflops(M_BENCH, N, K, t))
        try:
            t = bench(f8, a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn), iters=iters)
            row.update(xla_fp8_seconds=t, xla_fp8_tflops=tflops(M_BENCH, N, K, t))
        except Exception as e:  # noqa: BLE001
            row["xla_fp8_error"] = f"{type(e).__name__}: {e}"[:500]
        rows[f"{N}x{K}"] = row
        print("xla", row, flush=True)
    return rows


def render(results) -> str:
    m = results["machine"]
    lines = ["# FP8 GEMM kernels on GPU: compile, equality with interpret mode, TFLOPS", "",
             f"- command: `{results['command']}`", f"- device: {results['device_kind']}; jax {m.get('jax')}, "
             f"jaxlib {m.get('jaxlib')}; wall {results['wall_seconds']:.0f} s", *machine_lines(m),
             f"- TFLOPS = 2MNK / median time. DeepGEMM anchor: {DEEPGEMM['tflops']} TFLOPS at 4096x4096x7168 on "
             "H800 (a different GPU: H800 and H100 have the same FP8 tensor-core peak; H200 more bandwidth).", ""]
    for kernel, rec in results["kernels"].items():
        lines.append(f"## {kernel}: {'PASSED' if rec.get('passed') else 'FAILED'}\n")
        for e in rec["equality"]:
            lines.append(f"- {e['accum']} promote={e.get('promote_every', 128)} {e['M']}x{e['N']}x{e['K']}: "
                         + (f"max rel diff vs interpret {e['max_rel_diff_vs_interpret']:.2e}" if "error" not in e
                            else f"error `{e['error'][:300]}`"))
        if rec["bench"]:
            lines += ["", "| M | N | K | Pallas FP8 TFLOPS | XLA BF16 TFLOPS | XLA FP8 (per-tensor) TFLOPS |",
                      "|---|---|---|---|---|---|"]
            for b in rec["bench"]:
                x = results["xla"].get(f"{b['N']}x{b['K']}", {})
                lines.append(f"| {b['M']} | {b['N']} | {b['K']} | {b['tflops']:.0f} | "
                             f"{x.get('bf16_tflops', float('nan')):.0f} | "
                             f"{x.get('xla_fp8_tflops', float('nan')):.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="triton,mosaic_gpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"fp8_gpu_check: no GPU visible to JAX (backend {jax.default_backend()!r}); nothing was run. Run it "
              "on a CUDA (Hopper) machine with jax[cuda].", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    results = {"command": "python -m benchmarks.fp8_gpu_check " + " ".join(sys.argv[1:]),
               "device_kind": jax.devices()[0].device_kind, "deepgemm_anchor": DEEPGEMM, "kernels": {}, "xla": {}}
    any_ok = False
    for kernel in [k for k in args.kernels.split(",") if k]:
        if kernel not in CASES:
            raise SystemExit(f"fp8_gpu_check: --kernels: unknown kernel {kernel!r}; known: {sorted(CASES)}")
        rec = {"equality": [], "bench": []}
        results["kernels"][kernel] = rec
        any_ok |= check_kernel(kernel, rec, args.iters, args.skip_bench)
    if not args.skip_bench:
        results["xla"] = bench_xla(args.iters)
    results["wall_seconds"] = time.perf_counter() - t0
    results["machine"] = bench_machine(load_before, os.getloadavg())
    write_result_files(os.path.join(RESULTS, "fp8_gpu_check"), results, render(results))
    if not any_ok:
        print("fp8_gpu_check: no kernel compiled and matched interpret mode; see fp8_gpu_check.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
