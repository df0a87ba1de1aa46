"""Train-step throughput on CPU: this project (JAX, jit) vs transformers' DeepseekV3ForCausalLM (torch eager, AdamW).

Issue 3 acceptance item. Same shape for both, fp32, CPU, in the same process and the same run:

    vocab 4096, hidden 256, 4 layers (first dense, intermediate 704), 4 heads, q_lora 128, kv_lora 64,
    qk_nope 32, qk_rope 16, v 32, 32 routed experts top-4 in 4 groups top-2, 1 shared, expert width 128,
    seq 256, batch 8 (2,048 tokens a step), no MTP (transformers' model has none; `--mtp` also times ours
    with one MTP module, which does strictly more work).

Ours: `make_train_step(cfg, default_train_config())` (AdamW, clip 1.0, seq-wise balance loss alpha 1e-4,
aux-loss-free bias update, non-finite skip), jit with donate_argnums=0, batch {"tokens": int32 [1, 8, 257]}.
transformers: `model(input_ids, labels=input_ids).loss`, backward, clip_grad_norm_(1.0), AdamW(betas (0.9, 0.95),
weight_decay 0.1).step(), zero_grad(); torch.set_num_threads(2).

Timing: compile / warmup first, then `--steps` rounds; each round runs one step of every contender back to back
(ours, then transformers), so a load change on a shared machine hits both; tokens/s from the median step time,
ratio also as the median of per-round ratios. Load average is recorded before and after.

MFU: model FLOPs per token = 6 * N_act + 6 * L * T * H * (d_qk + d_v)
  N_act = count_params(cfg)["activated"]: every matmul weight one token uses (output head included, input
          embedding excluded, 4 of 32 routed experts per MoE layer; router and norms included, negligible),
  the second term = QK^T and PV, forward 2*T*H*(d_qk + d_v) per token per layer, x3 for fwd+bwd, counted over
  the full T x T score matrix (PaLM convention; causal masking halves the useful part), d_qk = nope + rope.
Peak: median fp32 GFLOP/s of jnp.dot(2048x2048, 2048x2048) measured in the same run (torch.mm also printed).

    python -m benchmarks.bench_train                # print the table
    python -m benchmarks.bench_train --mtp --write  # also with MTP; write benchmarks/results/bench_train_cpu.*
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import numpy as np

SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=704,
             moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096)
BATCH, SEQ = 8, 256
TOKENS = BATCH * SEQ


from benchmarks.common import time_calls
from deepseek_jax.provenance import git_rev, loadavg, machine, machine_lines, write_result_files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------------------------
# Peak
# ---------------------------------------------------------------------------------------------------------------
def matmul_peak(n=2048, reps=5):
    import jax
    import jax.numpy as jnp
    import torch
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    ts = time_calls(lambda: f(a, b), reps)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    tt = time_calls(lambda: torch.mm(ta, tb), reps)
    fl = 2 * n ** 3
    return {"n": n, "reps": reps, "jax_gflops": fl / statistics.median(ts) / 1e9,
            "jax_gflops_max": fl / min(ts) / 1e9, "torch_gflops": fl / statistics.median(tt) / 1e9,
            "torch_gflops_max": fl / min(tt) / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------
def flops_per_token(cfg, with_mtp: bool):
    from deepseek_jax.model import count_params
    c = count_params(cfg)
    n_act = c["activated"]
    layers = cfg.num_hidden_layers
    if with_mtp and cfg.num_nextn_predict_layers:
        inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        # each MTP module: its own params minus unused experts, plus the shared output head used again
        n_act += c["mtp"] - cfg.num_nextn_predict_layers * (inactive - cfg.vocab_size * cfg.hidden_size)
        layers += cfg.num_nextn_predict_layers
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = 6 * layers * SEQ * cfg.num_attention_heads * (d_qk + cfg.v_head_dim)
    return {"activated_params": n_act, "total_params": c["total"], "mtp_params": c["mtp"],
            "dense_flops": 6 * n_act, "attn_flops": attn, "flops_per_token": 6 * n_act + attn}


# ---------------------------------------------------------------------------------------------------------------
# Contenders: each is (name, step_fn) where step_fn() runs one full step and blocks until it is done
# ---------------------------------------------------------------------------------------------------------------
def build_ours(tokens_np, mtp: int, dispatch: str):
    import jax
    import jax.numpy as jnp
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.train.step import default_train_config, init_train_state, make_train_step

    cfg = ModelConfig(**SHAPE, num_nextn_predict_layers=mtp, routed_scaling_factor=2.5, rope_scaling=None,
                      moe_dispatch=dispatch, bos_token_id=None, eos_token_id=None)
    tc = default_train_config(total_steps=1000)
    state = init_train_state(cfg, tc, jax.random.PRNGKey(0), seq_len=SEQ)
    batch = {"tokens": jnp.asarray(tokens_np[None], jnp.int32)}  # [1, 8, 257]
    fn = jax.jit(make_train_step(cfg, tc), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "loss": None}

    def step():
        box["state"], m = compiled(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        box["loss"] = float(m["loss"])

    return cfg, step, box, compile_s


def build_hf(tokens_np, attn: str, experts: str):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hcfg = DeepseekV3Config(**SHAPE, num_key_value_heads=SHAPE["num_attention_heads"], routed_scaling_factor=2.5,
                            num_nextn_predict_layers=0, tie_word_embeddings=False, attention_dropout=0.0,
                            use_cache=False)
    kw = {} if experts == "default" else {"experts_implementation": experts}
    model = DeepseekV3ForCausalLM._from_config(hcfg, attn_implementation=attn, dtype=torch.float32, **kw)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.as_tensor(tokens_np[:, :SEQ], dtype=torch.long)
    box = {"loss": None}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        box["loss"] = float(loss.detach())

    n_params = sum(p.numel() for p in model.parameters())
    info = {"attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None) or "eager (default)",
            "total_params": n_params}
    return step, box, info


def time_breakdown(cfg, tokens_np, reps):
    """Our forward (loss only) and forward+backward (value_and_grad) jitted alone, same params and batch, vs the
    full step: the rest of the step is the optimizer, clipping, bias update and the non-finite select."""
    import jax
    import jax.numpy as jnp
    from deepseek_jax import model as model_lib
    from deepseek_jax.train import losses
    net = model_lib.Transformer(cfg)
    v = model_lib.init(cfg, jax.random.PRNGKey(0), SEQ)
    tok = jnp.asarray(tokens_np, jnp.int32)
    mask = jnp.ones((BATCH, SEQ), jnp.float32)

    def loss(params):
        out = net.apply({"params": params, "router": v["router"]}, tok[:, :-1])
        return losses.cross_entropy(out.logits, tok[:, 1:], mask)[0] / TOKENS

    res = {}
    for name, f in (("forward", jax.jit(loss)), ("forward+backward", jax.jit(jax.value_and_grad(loss)))):
        res[name] = round(statistics.median(time_calls(lambda: f(v["params"]), reps)) * 1e3, 1)
    return res


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender after compile")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attn_implementation")
    ap.add_argument("--experts", default="default",
                    help="comma list of transformers experts_implementation to time (default: the library's, "
                         "grouped_mm in "
                         "5.x; e.g. default,eager); the fastest is the baseline of the ratio")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time our jitted forward loss and forward+backward alone (where the step time goes)")
    ap.add_argument("--mtp", action="store_true", help="also time ours with num_nextn_predict_layers=1")
    ap.add_argument("--dispatch", default="auto", help="our moe_dispatch (auto = sorted_tiles on CPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--write", action="store_true", help="write experiments/results/bench_train_cpu.{md,json}")
    args = ap.parse_args(argv)

    import torch
    import transformers
    torch.set_num_threads(args.threads)

    load_before = loadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"load average before: {load_before}", flush=True)
    peak = matmul_peak()
    print(f"matmul peak fp32 2048^3: jax {peak['jax_gflops']:.1f} GFLOP/s (max {peak['jax_gflops_max']:.1f}), "
          f"torch {peak['torch_gflops']:.1f} GFLOP/s", flush=True)

    rng = np.random.default_rng(0)
    tokens_np = rng.integers(0, SHAPE["vocab_size"], size=(BATCH, SEQ + 1), dtype=np.int32)

    contenders = []  # (name, step, box, meta)
    cfg, step, box, compile_s = build_ours(tokens_np, 0, args.dispatch)
    fl = flops_per_token(cfg, False)
    contenders.append(("deepseek_jax (no MTP)", step, box,
                       {"compile_s": compile_s, "flops": fl, "moe_dispatch": args.dispatch}))
    print(f"ours compiled in {compile_s:.1f} s; params total {fl['total_params']:,}, "
          f"activated {fl['activated_params']:,}", flush=True)
    if args.mtp:
        cfg_m, step_m, box_m, compile_m = build_ours(tokens_np, 1, args.dispatch)
        fl_m = flops_per_token(cfg_m, True)
        contenders.append(("deepseek_jax (MTP D=1)", step_m, box_m,
                           {"compile_s": compile_m, "flops": fl_m, "moe_dispatch": args.dispatch}))
        print(f"ours+MTP compiled in {compile_m:.1f} s", flush=True)
    for experts in args.experts.split(","):
        hf_step, hf_box, hf_info = build_hf(tokens_np, args.attn, experts)
        contenders.append((f"transformers DeepseekV3ForCausalLM (torch eager, attn={hf_info['attn_implementation']}"
                           f", experts={hf_info['experts_implementation']})", hf_step, hf_box,
                           {"flops": fl, **hf_info}))
        print(f"transformers: {hf_info}", flush=True)

    for name, step, box, _ in contenders:
        for _ in range(args.warmup):
            step()
        print(f"warm: {name}: loss {box['loss']:.4f}", flush=True)

    times = {name: [] for name, *_ in contenders}
    for r in range(args.steps):
        line = []
        for name, step, box, _ in contenders:
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            line.append(f"{dt * 1e3:.0f} ms")
        print(f"round {r}: " + ", ".join(line) + f"  (load {loadavg()[0]})", flush=True)
    breakdown = None
    if args.breakdown:
        breakdown = time_breakdown(cfg, tokens_np, args.steps)
        print(f"breakdown (ms, median): {breakdown}", flush=True)
    load_after = loadavg()

    # the baseline: the fastest transformers contender (median step), so the ratio is never flattered
    hf_name = min((c[0] for c in contenders if c[0].startswith("transformers")),
                  key=lambda n: statistics.median(times[n]))
    rows = []
    for name, _, box, meta in contenders:
        ts = times[name]
        med = statistics.median(ts)
        tps = TOKENS / med
        flops = meta["flops"]["flops_per_token"]
        achieved = tps * flops / 1e9
        ratios = [h / t for h, t in zip(times[hf_name], ts)]
        rows.append({"name": name, "step_ms_median": med * 1e3, "step_ms_min": min(ts) * 1e3,
                     "step_ms_all": [t * 1e3 for t in ts], "tokens_per_s": tps, "tokens_per_s_best": TOKENS / min(ts),
                     "speedup_vs_transformers": statistics.median(ratios),
                     "speedup_best": min(times[hf_name]) / min(ts), "gflops": achieved,
                     "mfu_vs_jax_peak": achieved / peak["jax_gflops"],
                     "mfu_vs_torch_peak": achieved / peak["torch_gflops"], "final_loss": box["loss"],
                     **{k: v for k, v in meta.items() if k != "flops"}})

    fl_info = contenders[0][3]["flops"]
    # Roofline check of the 2x goal: the FLOP rate a step needs to be twice as fast as transformers' fastest step,
    # against the fastest fp32 matmul this machine ran in the same run (no model step can beat its own matmuls).
    hf_best_tps = TOKENS / min(times[hf_name])
    goal = {"goal_tokens_per_s": 2 * hf_best_tps,
            "needed_gflops": 2 * hf_best_tps * fl_info["flops_per_token"] / 1e9,
            "peak_gflops_best": max(peak["jax_gflops_max"], peak.get("torch_gflops_max", 0.0))}
    goal["needed_fraction_of_peak"] = goal["needed_gflops"] / goal["peak_gflops_best"]
    roofline = (f"Roofline of the 2x goal: 2 x transformers' best step = {goal['goal_tokens_per_s']:,.0f} tokens/s "
                f"= {goal['needed_gflops']:.1f} GFLOP/s of model FLOPs, i.e. "
                f"{100 * goal['needed_fraction_of_peak']:.0f}% of the fastest fp32 2048^3 matmul measured in this run "
                f"({goal['peak_gflops_best']:.1f} GFLOP/s).")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    header = ("| contender | step ms (median) | step ms (min) | tokens/s | x transformers (median of per-round) "
              "| x transformers (best / best) | model GFLOP/s | MFU vs jnp.dot peak | MFU vs torch.mm peak |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_ms_median']:.0f} | {r['step_ms_min']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"**{r['speedup_vs_transformers']:.2f}** | {r['speedup_best']:.2f} | {r['gflops']:.1f} | "
                     f"{100 * r['mfu_vs_jax_peak']:.1f}% | "
                     f"{100 * r['mfu_vs_torch_peak']:.1f}% |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\nFLOPs/token (no MTP): 6*{fl_info['activated_params']:,} + {fl_info['attn_flops']:,} = "
          f"{fl_info['flops_per_token'] / 1e6:.1f} MFLOP; peak jnp.dot {peak['jax_gflops']:.1f} GFLOP/s, "
          f"torch.mm {peak['torch_gflops']:.1f} GFLOP/s; load average {load_before} -> {load_after}")
    print(roofline)

    if args.write:
        machine_rec = machine(load_before, load_after, torch=torch.__version__,
                                torch_threads=torch.get_num_threads(), transformers=transformers.__version__)
        rev = git_rev()
        out = {"command": cmd, "date": date, "git": rev, "machine": machine_rec, "shape": {**SHAPE, "batch": BATCH,
               "seq": SEQ, "tokens_per_step": TOKENS}, "peak": peak, "flops": fl_info,
               "flops_mtp": contenders[1][3]["flops"] if args.mtp else None, "rows": rows,
               "steps": args.steps, "warmup": args.warmup, "breakdown_ms": breakdown, "goal": goal}
        md = [
            "# Train-step throughput on CPU: deepseek_jax vs transformers DeepseekV3ForCausalLM",
            "",
            f"Generated by `{cmd}` (git {rev}) on {date}.",
            "",
            f"- shape: {', '.join(f'{k}={v}' for k, v in SHAPE.items())}; batch {BATCH} x seq {SEQ} = "
            f"{TOKENS} tokens/step; fp32; no MTP unless the row says so (transformers has none)",
            f"- ours: `make_train_step(cfg, default_train_config())` jit(donate_argnums=0), moe_dispatch="
            f"{args.dispatch} (auto = sorted_tiles on CPU), AdamW + clip 1.0 + balance loss alpha 1e-4 + bias update",
            f"- transformers {transformers.__version__}: torch {torch.__version__} eager, attn_implementation="
            f"{hf_info['attn_implementation']}, experts implementation {args.experts} (ratio baseline: the fastest "
            f"transformers row), AdamW(betas (0.9, 0.95), "
            f"wd 0.1), clip_grad_norm_ 1.0, {torch.get_num_threads()} threads; params {hf_info['total_params']:,} "
            f"(ours {fl_info['total_params']:,})",
            *machine_lines(machine_rec, note=(
                " (busy before the run: another job was running, so timings are noisy)"
                if load_before[0] > 0.75 * (os.cpu_count() or 1) else
                " (quiet before the run; the benchmark's own threads raise the load while it runs)")),
            f"- timing: {args.warmup} warmup steps each after compile, then {args.steps} rounds, one step of every "
            f"contender per round back to back; median step time; the ratio is the median of per-round ratios; "
            f"'best / best' = "
            f"fastest transformers step / our fastest step (closest to an unloaded machine: torch's OpenMP threads "
            f"suffer far more than XLA's from a competing process, which inflates the median ratio under load)",
            f"- FLOPs/token = 6 * N_act + 6 * L * T * H * (d_qk + d_v) = 6 * {fl_info['activated_params']:,} + "
            f"{fl_info['attn_flops']:,} = {fl_info['flops_per_token'] / 1e6:.2f} MFLOP (N_act = count_params "
            f"activated: output head in, input embedding out, 4/32 routed experts; attention over the full T x T "
            f"scores). MTP row: + the MTP module's activated params and head, one more attention layer.",
            f"- peak: fp32 2048^3 matmul, median of {peak['reps']}: jnp.dot {peak['jax_gflops']:.1f} GFLOP/s "
            f"(best {peak['jax_gflops_max']:.1f}), torch.mm {peak['torch_gflops']:.1f} GFLOP/s",
            "",
            table,
            "",
            roofline,
            "",
            (f"Breakdown of our no-MTP step (separately jitted, median ms): {breakdown}" if breakdown else ""),
            "",
            "Per-step times (ms): " + "; ".join(
                f"{r['name']}: " + ", ".join(f"{t:.0f}" for t in r["step_ms_all"]) for r in rows),
            "",
        ]
        write_result_files(os.path.join(RESULTS, "bench_train_cpu"), out, "\n".join(md), indent=2)
    return rows


if __name__ == "__main__":
    main()
