"""FP8 GEMM accumulation error vs K, with and without promotion (V3 §3.3.2, docs/fp8.md "Limited accumulation").

    python experiments/fp8_accumulation.py [--seeds 3] [--m 32] [--n 128]
    python experiments/fp8_accumulation.py --report     # rebuild md/png from accumulation.json

For each K in 1K..16K: Gaussian A [M, K] and B [N, K], quantized to E4M3 in 1x128 tiles (both K-major), multiplied
by the Pallas kernel (interpret mode on CPU) with
  accum="limited", mantissa_bits in {12, 13, 14}, promote_every in {128, None (never)}, and accum="fp32";
error = max |C - C_ref| / max |C_ref| with C_ref the float64 product of the same fp8 values and scales (so only
accumulation error is measured). Mean over seeds. The paper's "~2% max relative error at K = 4096" (H800, no
promotion) is drawn as a point: it depends on the hardware's exact rounding, which this emulation only
approximates by truncating the running sum to ``mantissa_bits`` after every 32-wide step.

Writes experiments/results/fp8/accumulation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import time


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.ops import fp8, fp8_pallas  # noqa: E402
from experiments.fp8_common import RESULTS, provenance, provenance_md, write_json, write_text  # noqa: E402

KS = (1024, 2048, 4096, 8192, 16384)
BITS = (12, 13, 14)
PAPER = {"K": 4096, "max_rel_err": 0.02, "source": "V3 §3.3.2: 'maximum relative error of nearly 2%' (H800, "
         "K = 4096, no promotion)"}


def one(K: int, M: int, N: int, seed: int, **kw) -> float:
    r = np.random.RandomState(seed)
    a = jnp.asarray(r.normal(size=(M, K)), jnp.float32)
    b = jnp.asarray(r.normal(size=(N, K)), jnp.float32)
    a_q, a_s = fp8.quantize_1x128(a)
    b_q, b_s = fp8.quantize_1x128(b)
    ref = (np.asarray(fp8.dequantize(a_q, a_s, (1, 128)), np.float64)
           @ np.asarray(fp8.dequantize(b_q, b_s, (1, 128)), np.float64).T)
    out = np.asarray(fp8_pallas.fp8_gemm(a_q, a_s, b_q, b_s, kernel="interpret", **kw), np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--report", action="store_true", help="rebuild the md/png from accumulation.json only")
    args = ap.parse_args()
    if args.report:
        import json
        with open(os.path.join(RESULTS, "accumulation.json")) as f:
            res = json.load(f)
        report(res)
        return
    t0 = time.time()
    rows = []
    for K in KS:
        cases = [("fp32", None, 128)] + [("limited", b, pe) for b in BITS for pe in (128, None)]
        for accum, bits, pe in cases:
            kw = dict(accum=accum, promote_every=pe)
            if bits is not None:
                kw["mantissa_bits"] = bits
            errs = [one(K, args.m, args.n, s, **kw) for s in range(args.seeds)]
            rows.append(dict(K=K, accum=accum, mantissa_bits=bits, promote_every=pe, err_mean=float(np.mean(errs)),
                             err_max=float(np.max(errs)), errs=errs))
            print(f"K={K:6d} {accum:8s} bits={bits} promote={pe}: {np.mean(errs):.3e}", flush=True)
    prov = provenance()
    res = dict(description=__doc__.split("\n\n")[1].strip(), shape=dict(M=args.m, N=args.n), seeds=args.seeds,
               paper=PAPER, rows=rows, wall_s=round(time.time() - t0, 1), provenance=prov)
    write_json("accumulation.json", res)
    report(res)


def report(res):
    rows, prov, m, n, seeds = res["rows"], res["provenance"], res["shape"]["M"], res["shape"]["N"], res["seeds"]

    def get(accum, bits, pe, K):
        return next(r["err_mean"] for r in rows if r["K"] == K and r["accum"] == accum
                    and r["mantissa_bits"] == bits and r["promote_every"] == pe)

    lines = ["# FP8 accumulation error vs K (emulated limited-precision accumulation)\n", provenance_md(prov),
             f"\nA [{m}, K] x B [{n}, K], Gaussian, E4M3 1x128 tiles; error = max|C - C_ref| / max|C_ref| "
             f"vs the float64 product of the same fp8 values; mean of {seeds} seeds. Paper: ~2% at K = 4096 "
             "without promotion (H800).\n", "\n| K | fp32 | " + " | ".join(
                 f"{b} bits, no promotion | {b} bits, promote 128" for b in BITS) + " |",
             "|---|---|" + "---|---|" * len(BITS)]
    for K in KS:
        cells = [f"{get('fp32', None, 128, K):.1e}"]
        for b in BITS:
            cells += [f"{get('limited', b, None, K):.1e}", f"{get('limited', b, 128, K):.1e}"]
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    write_text("accumulation.md", "\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(BITS, ("tab:red", "tab:orange", "tab:blue")))
    for b in BITS:
        ax.plot(KS, [get("limited", b, None, K) for K in KS], "-o", color=colors[b], label=f"{b} bits, no promotion")
        ax.plot(KS, [get("limited", b, 128, K) for K in KS], "--s", color=colors[b],
                label=f"{b} bits, promote every 128")
    ax.plot(KS, [get("fp32", None, 128, K) for K in KS], ":", color="gray", label="fp32 partial sums")
    ax.plot([PAPER["K"]], [PAPER["max_rel_err"]], "k*", ms=14, label="paper: ~2% at K=4096 (H800)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (contraction length)")
    ax.set_ylabel("max |C - C_ref| / max |C_ref|")
    ax.set_title("FP8 GEMM accumulation error (emulated, truncation per 32-wide step)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "accumulation.png"), dpi=120)
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()
