"""The model on one GPU: train-step time and MFU of a small V3-shaped MoE in bf16 for each attention core and MoE
dispatch, an optimized-HLO check that no expert GEMM went dense, and decode tokens/s.

    python -m benchmarks.gpu_check [--steps 10] [--write]

Needs a CUDA GPU; without one it prints why and exits with status 0 (nothing to check here). Budget: about 5-8
minutes on an H100/H200 (compiles dominate: one train step per (attention_impl, moe_dispatch) pair).

Model: V3's shapes cut down (``SMALL_V3`` below: d 1024, 8 heads of MLA 128+64 / 128, kv_lora 512, q_lora 384,
64 experts of 512, top-6 of 8 groups / 4 kept, one dense + three MoE layers, MTP depth 1), bf16 compute, fp32
master weights, batch 8 x 2048 tokens. For each attention_impl in (xla, cudnn) and moe_dispatch in (grouped,
ragged, sorted_tiles):
  1. compile ``make_train_step`` and time ``--steps`` steps (median), report tokens/s and MFU = model FLOPs/token x
     tokens/s / the GPU's dense bf16 peak (``PEAK_BF16`` by device kind; model FLOPs as
     benchmarks/bench_train.py: 6 N_act + 6 L T H (d_qk + d_v), MTP included);
  2. read the OPTIMIZED HLO (``compiled.as_text()``) and fail the pair if any dot or custom-call GEMM has an operand
     whose leading dimension is the expert count E with the token count behind it (an expert GEMM computed for
     every expert over all rows: what XLA:GPU can make of ragged_dot); the grouped dispatch must show its Triton
     kernel (``__gpu$xla.gpu.triton``), cudnn its fused attention (``__cudnn$fmha``).
Then decode: ``generate.generate_batch`` at batch 8, 128 prompt tokens + 128 new, tokens/s after a warm-up call.
Writes benchmarks/results/gpu_check_<device>.{json,md} with --write.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config as config_lib
from deepseek_jax import generate
from deepseek_jax import model as model_lib
from benchmarks.common import time_calls
from deepseek_jax.provenance import git_rev, write_result_files
from deepseek_jax.train.step import default_train_config, init_train_state, make_train_step

PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "H800": 989.5e12, "A100": 312e12, "GH200": 989.5e12}
ATTENTION_IMPLS = ("xla", "cudnn")
DISPATCHES = ("grouped", "ragged", "sorted_tiles")
BATCH, SEQ = 8, 2048


def small_v3(**kw):
    return config_lib.ModelConfig(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, q_lora_rank=384,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=2816,
        moe_intermediate_size=512, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8,
        topk_group=4, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096,
        dtype="bfloat16", param_dtype="float32", **kw)


def flops_per_token(cfg, seq: int) -> float:
    cfg = cfg.replace(attention_impl="xla")  # count_params traces init; the core does not change the count
    c = model_lib.count_params(cfg)
    inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_act = c["activated"] + c["mtp"] - cfg.num_nextn_predict_layers * (inactive - cfg.vocab_size * cfg.hidden_size)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return 6 * n_act + 6 * layers * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


_SHAPE = re.compile(r"\b(?:bf16|f32|f16)\[([\d,]+)\]")


def dense_expert_gemms(hlo: str, n_experts: int, n_rows: int):
    """Lines of optimized HLO whose dot / GEMM custom-call has an operand or result [E, >= n_rows, ...]: an expert
    GEMM over all rows (the dense form). Returns the offending lines (empty = none went dense)."""
    bad = []
    for line in hlo.splitlines():
        if not (" dot(" in line or "custom-call" in line and ("gemm" in line.lower() or "cublas" in line.lower())):
            continue
        for dims in _SHAPE.findall(line):
            s = [int(x) for x in dims.split(",")]
            if len(s) >= 3 and s[0] == n_experts and s[1] >= n_rows:
                bad.append(line.strip()[:200])
                break
    return bad


def peak_for(kind: str):
    for k, v in PEAK_BF16.items():
        if k in kind:
            return v
    return None


def run(steps: int):
    dev = jax.devices()[0]
    kind = dev.device_kind
    peak = peak_for(kind)
    tc = default_train_config(total_steps=1000)
    tokens = np.random.RandomState(0).randint(0, 32768, size=(1, BATCH, SEQ + 1)).astype(np.int32)
    rows = []
    for impl in ATTENTION_IMPLS:
        for dispatch in DISPATCHES:
            cfg = small_v3(attention_impl=impl, moe_dispatch=dispatch)
            row = {"attention_impl": impl, "moe_dispatch": dispatch}
            state = None
            try:
                state = init_train_state(cfg, tc, jax.random.PRNGKey(0), seq_len=SEQ)
                step = jax.jit(make_train_step(cfg, tc), donate_argnums=(0,))
                batch = {"tokens": jnp.asarray(tokens)}
                t0 = time.perf_counter()
                compiled = step.lower(state, batch).compile()
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                hlo = compiled.as_text()
                row["dense_expert_gemms"] = dense_expert_gemms(hlo, cfg.n_routed_experts, BATCH * SEQ // 2)
                row["triton_kernel"] = "__gpu$xla.gpu.triton" in hlo
                row["cudnn_attention"] = "__cudnn$fmha" in hlo
                box = [state]

                def one():
                    box[0], m = compiled(box[0], batch)
                    return m["loss"]

                ts = time_calls(one, steps, warmup=2)
                t = float(np.median(ts))
                tok_s = BATCH * SEQ / t
                row.update(step_s=t, tokens_per_s=tok_s,
                           mfu=(flops_per_token(cfg, SEQ) * tok_s / peak) if peak else None)
                row["ok"] = (not row["dense_expert_gemms"]
                             and (dispatch != "grouped" or row["triton_kernel"])
                             and (impl != "cudnn" or row["cudnn_attention"]))
            except Exception as e:  # a pair that fails to compile is recorded, the run goes on
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            print(row, flush=True)
            rows.append(row)
            del state
    # decode
    cfg = small_v3(attention_impl="xla", moe_dispatch="auto")
    variables = model_lib.init(cfg, jax.random.PRNGKey(0))
    prompts = [list(range(1, 129))] * 8
    generate.generate_batch(cfg, variables, prompts, 128)  # compile
    t0 = time.perf_counter()
    out = generate.generate_batch(cfg, variables, prompts, 128)
    dt = time.perf_counter() - t0
    decode = {"batch": 8, "prompt": 128, "new": 128, "seconds": dt,
              "tokens_per_s": sum(len(o) for o in out) / dt}
    return {"device": kind, "peak_bf16": peak, "jax": jax.__version__, "code_version": git_rev(dirty=False),
            "batch": BATCH, "seq": SEQ, "steps": steps, "train": rows, "decode": decode}


def to_md(r) -> str:
    lines = [f"# GPU check on {r['device']}", "", f"Command: `python -m benchmarks.gpu_check --steps {r['steps']}`;"
             f" jax {r['jax']}; code {r['code_version']}. Batch {r['batch']} x {r['seq']} tokens, bf16.", "",
             "| attention_impl | moe_dispatch | step (s) | tokens/s | MFU | no dense expert GEMM | kernels | ok |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for x in r["train"]:
        if "error" in x:
            lines.append(f"| {x['attention_impl']} | {x['moe_dispatch']} | error: {x['error'][:120]} | | | | | no |")
            continue
        mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a"
        kern = ", ".join(k for k, v in (("triton", x["triton_kernel"]), ("cudnn", x["cudnn_attention"])) if v)
        lines.append(f"| {x['attention_impl']} | {x['moe_dispatch']} | {x['step_s']:.3f} | {x['tokens_per_s']:,.0f} "
                     f"| {mfu} | {'yes' if not x['dense_expert_gemms'] else 'NO'} | {kern} | "
                     f"{'yes' if x['ok'] else 'NO'} |")
    d = r["decode"]
    lines += ["", f"Decode: batch {d['batch']}, {d['prompt']}-token prompts, {d['new']} new tokens: "
              f"{d['tokens_per_s']:,.0f} tokens/s ({d['seconds']:.2f} s).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"benchmarks.gpu_check: no GPU (jax backend {jax.default_backend()!r}); nothing to check. Run it on a "
              "CUDA machine (pip install -e '.[gpu]').")
        return 0
    r = run(args.steps)
    md = to_md(r)
    print(md)
    if args.write:
        import os
        name = re.sub(r"[^A-Za-z0-9]+", "_", r["device"]).strip("_")
        write_result_files(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu_check_{name}"),
                           r, md)
    return 0 if all(x.get("ok") for x in r["train"]) else 1


if __name__ == "__main__":
    sys.exit(main())
