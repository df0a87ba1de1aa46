"""Compile the FP8 Pallas kernel on a GPU, check it against interpret mode, and benchmark it (issue 5).

    python -m benchmarks.fp8_gpu_check [--backends triton,mosaic_gpu] [--iters 20] [--skip-bench]

Needs a CUDA GPU (Hopper for FP8 tensor cores); exits with status 2 and a message when JAX sees none. For each
Pallas GPU backend (Triton via ``jax.experimental.pallas.triton.CompilerParams``; Mosaic GPU via
``jax.experimental.pallas.mosaic_gpu.CompilerParams``):
  1. compile ops/fp8_pallas.fp8_gemm (K loop inside each program, the GPU form) for accum="fp32" and for
     accum="limited" (14 bits, promotion every 128 and never);
  2. check each equals interpret mode on the same inputs (max |diff| / max |ref| < 1e-5; for "limited" the
     truncation points are the same, so the same bound applies unless the backend reorders the 32-wide sums);
  3. time it at M = 4096 and (N, K) in {7168x2048, 2048x7168, 4096x7168, 24576x1536} (V3's GEMM shapes) and report
     TFLOPS = 2 M N K / t next to XLA's BF16 matmul and XLA's own FP8 dot_general at the same shape. DeepGEMM's
     published anchor: 1304 TFLOPS at M=4096, N=4096, K=7168 on H800 (FP8.md).
A backend that fails to lower is recorded with its error (the run goes on); the script exits non-zero when no
backend passes the equality check. Writes experiments/results/fp8/gpu_check.{json,md} with the device and the
jax/jaxlib versions.
"""

from __future__ import annotations

import argparse
import sys
import traceback


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.ops import fp8, fp8_pallas  # noqa: E402
from benchmarks.common import time_calls  # noqa: E402
from experiments.fp8_common import provenance, provenance_md, write_json, write_text  # noqa: E402

M_BENCH = 4096
SHAPES_NK = [(7168, 2048), (2048, 7168), (4096, 7168), (24576, 1536)]
DEEPGEMM = {"M": 4096, "N": 4096, "K": 7168, "tflops": 1304, "device": "H800", "source": "DeepGEMM README table"}


def compiler_params(backend: str):
    if backend == "triton":
        from jax.experimental.pallas import triton as plt
        return plt.CompilerParams(num_warps=8, num_stages=3)
    if backend == "mosaic_gpu":
        from jax.experimental.pallas import mosaic_gpu as plgpu
        return plgpu.CompilerParams()
    raise ValueError(f"unknown backend {backend!r}")


def operands(M, N, K, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a_q, a_s = fp8.quantize_1x128(jax.random.normal(k1, (M, K), jnp.float32))
    b_q, b_s = fp8.quantize_128x128(jax.random.normal(k2, (N, K), jnp.float32) * 0.05)
    return a_q, a_s, b_q, b_s


def bench(fn, *args, iters=20):
    return float(np.median(time_calls(lambda: fn(*args), iters, warmup=4)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="triton,mosaic_gpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--bn", type=int, default=128)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        print(f"fp8_gpu_check: no GPU visible to JAX (default backend {jax.default_backend()!r}, devices "
              f"{jax.devices()}); install jax[cuda] and run this on a GPU machine.", file=sys.stderr)
        sys.exit(2)
    import jaxlib
    prov = provenance()
    prov["jaxlib"] = getattr(jaxlib, "__version__", "unknown")
    prov["device_kind"] = jax.devices()[0].device_kind
    results = {"provenance": prov, "deepgemm_anchor": DEEPGEMM, "backends": {}, "xla": {}}

    cases = [dict(accum="fp32"), dict(accum="limited", mantissa_bits=14, promote_every=128),
             dict(accum="limited", mantissa_bits=14, promote_every=None)]
    a_q, a_s, b_q, b_s = operands(256, 512, 384)
    any_ok = False
    for backend in [b for b in args.backends.split(",") if b]:
        rec = {"equality": [], "bench": []}
        results["backends"][backend] = rec
        try:
            cp = compiler_params(backend)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            rec["error"] = f"{type(e).__name__}: {e}"
            continue
        ok = True
        for case in cases:
            entry = dict(case)
            try:
                ref = fp8_pallas.fp8_gemm(a_q, a_s, b_q, b_s, interpret=True, k_in_grid=False, **case)
                fn = jax.jit(lambda *x, case=case: fp8_pallas.fp8_gemm(
                    *x, interpret=False, k_in_grid=False, bm=args.bm, bn=args.bn, compiler_params=cp, **case))
                out = fn(a_q, a_s, b_q, b_s)
                err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
                entry.update(max_rel_diff_vs_interpret=err, passed=err < 1e-5)
                ok &= err < 1e-5
            except Exception as e:  # noqa: BLE001
                entry.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
                ok = False
            rec["equality"].append(entry)
            print(backend, entry.get("max_rel_diff_vs_interpret", entry.get("error", "")[:300]), flush=True)
        rec["passed"] = ok
        any_ok |= ok
        if ok and not args.skip_bench:
            fn = jax.jit(lambda *x: fp8_pallas.fp8_gemm(*x, interpret=False, k_in_grid=False, bm=args.bm,
                                                        bn=args.bn, compiler_params=cp))
            for N, K in SHAPES_NK:
                ops = operands(M_BENCH, N, K)
                t = bench(fn, *ops, iters=args.iters)
                rec["bench"].append(dict(M=M_BENCH, N=N, K=K, seconds=t, tflops=2 * M_BENCH * N * K / t / 1e12))
                print(backend, rec["bench"][-1], flush=True)

    if not args.skip_bench:
        bf16 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                        preferred_element_type=jnp.bfloat16))
        f8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.float32))
        for N, K in SHAPES_NK:
            k1, k2 = jax.random.split(jax.random.PRNGKey(1))
            a = jax.random.normal(k1, (M_BENCH, K), jnp.bfloat16)
            b = jax.random.normal(k2, (N, K), jnp.bfloat16)
            row = dict(M=M_BENCH, N=N, K=K)
            t = bench(bf16, a, b, iters=args.iters)
            row.update(bf16_seconds=t, bf16_tflops=2 * M_BENCH * N * K / t / 1e12)
            try:  # XLA's per-tensor FP8 GEMM (no block scales): the library ceiling on this device
                t = bench(f8, a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn), iters=args.iters)
                row.update(xla_fp8_seconds=t, xla_fp8_tflops=2 * M_BENCH * N * K / t / 1e12)
            except Exception as e:  # noqa: BLE001
                row["xla_fp8_error"] = f"{type(e).__name__}: {e}"[:500]
            results["xla"][f"{N}x{K}"] = row
            print("xla", row, flush=True)

    write_json("gpu_check.json", results)
    lines = ["# FP8 Pallas kernel on GPU: compile, equality with interpret mode, TFLOPS\n", provenance_md(prov),
             f"\nDevice: {prov['device_kind']}; jaxlib {prov['jaxlib']}. TFLOPS = 2MNK / median time. DeepGEMM "
             f"anchor: {DEEPGEMM['tflops']} TFLOPS at 4096x4096x7168 on H800.\n"]
    for backend, rec in results["backends"].items():
        lines.append(f"\n## {backend}: {'PASSED' if rec.get('passed') else 'FAILED'}\n")
        if "error" in rec:
            lines.append(f"- {rec['error']}")
        for e in rec["equality"]:
            lines.append(f"- {e.get('accum')} bits={e.get('mantissa_bits', '-')} promote={e.get('promote_every', 128)}"
                         f": " + (f"max rel diff {e['max_rel_diff_vs_interpret']:.2e}" if "error" not in e
                                  else f"error `{e['error'][:300]}`"))
        if rec["bench"]:
            lines += ["", "| M | N | K | Pallas FP8 TFLOPS | XLA BF16 TFLOPS | XLA FP8 (per-tensor) TFLOPS |",
                      "|---|---|---|---|---|---|"]
            for b in rec["bench"]:
                x = results["xla"].get(f"{b['N']}x{b['K']}", {})
                lines.append(f"| {b['M']} | {b['N']} | {b['K']} | {b['tflops']:.0f} | "
                             f"{x.get('bf16_tflops', float('nan')):.0f} | {x.get('xla_fp8_tflops', float('nan')):.0f} |")
    write_text("gpu_check.md", "\n".join(lines) + "\n")
    if not any_ok:
        print("fp8_gpu_check: no Pallas GPU backend compiled the kernel correctly; see gpu_check.md",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
