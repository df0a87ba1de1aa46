"""MTP self-speculative decoding on a trained model: acceptance rate and speed-up over plain greedy decoding.

V3 §5.4.3 reports 85-90% acceptance of the second token and 1.8x tokens/s for the full model. The model is a
training run's checkpoint with an MTP module, by default the quickstart's:

    python -m experiments.run --config=experiments/configs/quickstart.py --config.loop.out_dir=runs/decode_quickstart
    python -m benchmarks.speculative --run runs/decode_quickstart --write

Prompts: the first `--prompt-len` tokens of the first `--prompts` validation documents of the run's corpus (the
same hash split the run used, so the model never trained on them). Each prompt is continued greedily by up to
`--new` tokens (stopping at EOS) twice: plain (generate.generate) and speculative (generate.generate_speculative,
batch 1). The outputs must be identical token for token (the script fails otherwise). Acceptance rate = accepted
drafts / verified drafts over all prompts; tokens/s = new tokens / wall time of the call (compile excluded: one
untimed call of each first); rounds alternate plain and speculative; median of `--rounds` per prompt. Writes
experiments/results/decode_speculative_quickstart.{md,json} with --write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


from benchmarks.common import command_and_date, time_calls
from deepseek_jax import compat
from deepseek_jax.provenance import git_rev, loadavg, machine, machine_lines, write_result_files


def step_costs(generate, cfg, variables, cache_len, reps=50):
    """Median ms of one jitted main-model decode step with T=1 (plain) and T=2 (verify) tokens, and of one MTP
    step with T=2, each with the MoE dispatch generate.py uses for it: where the speed-up goes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_jax.model import Transformer

    cache, mcache = generate.init_cache(cfg, 1, cache_len), generate.init_mtp_cache(cfg, 1, cache_len)
    out = {}
    for T in (1, 2):
        c = generate._step_cfg(cfg, T)
        tok = jnp.zeros((1, T), jnp.int32)
        pos = jnp.arange(cache_len // 2, cache_len // 2 + T, dtype=jnp.int32)[None]
        fns = {f"main_T{T}": (jax.jit(lambda v, t, p, k: Transformer(c).apply(v, t, p, k, absorb=True).logits),
                              (variables, tok, pos, cache))}
        if T == 2:
            h = jnp.ones((1, T, cfg.hidden_size), jnp.float32)
            fns["mtp_T2"] = (jax.jit(lambda v, h, t, p, k: generate._mtp_apply(c, v, h, t, p, k, True)[0]),
                             (variables, h, tok, pos, mcache))
        for name, (f, a) in fns.items():
            out[name] = round(float(np.median(time_calls(lambda: f(*a), reps))) * 1e3, 3)
        out[f"moe_dispatch_T{T}"] = c.moe_dispatch
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/decode_quickstart", help="training run directory (experiments.run)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    host = compat.use_cpu_settings()  # what the generate CLI runs with, before jax starts its backends

    from deepseek_jax import data as data_lib
    from deepseek_jax import generate

    load_before = loadavg()
    cmd, date = command_and_date("benchmarks.speculative", argv)
    cfg, variables, tok_spec, step = generate.load_run(args.run)
    with open(os.path.join(args.run, "config.json")) as f:
        run_cfg = json.load(f)
    tok = data_lib.get_tokenizer(tok_spec)
    docs = data_lib.load_corpus(run_cfg["data.corpus"])
    _, val_docs = data_lib.split(docs, run_cfg["data.val_fraction"])
    prompts = []
    for d in val_docs:
        ids = tok.encode(d.text)
        if len(ids) >= args.prompt_len:
            prompts.append(ids[:args.prompt_len])
        if len(prompts) == args.prompts:
            break
    max_len = args.prompt_len + args.new

    def plain(p):
        return generate.generate(cfg, variables, p, args.new, eos_id=tok.eos_id, max_len=max_len)

    def spec(p):
        return generate.generate_speculative(cfg, variables, p, args.new, eos_id=tok.eos_id, max_len=max_len)

    t0 = time.perf_counter()
    plain(prompts[0]), spec(prompts[0])
    compile_s = time.perf_counter() - t0
    rows = []
    for i, p in enumerate(prompts):
        a = plain(p)
        b, stats = spec(p)
        if not (len(a) == len(b) and (a == b).all()):
            raise SystemExit(f"prompt {i}: speculative output differs from plain greedy decoding")
        t_plain, t_spec = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            plain(p)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            spec(p)
            t_spec.append(time.perf_counter() - t0)
        row = {"prompt": tok.decode(p), "new_tokens": len(a), "verify_steps": stats["verify_steps"],
               "drafts_accepted": stats["drafts_accepted"], "acceptance_rate": stats["acceptance_rate"],
               "tokens_per_step": stats["tokens_per_step"], "plain_s": t_plain, "speculative_s": t_spec,
               "plain_tokens_per_s": len(a) / statistics.median(t_plain),
               "speculative_tokens_per_s": len(a) / statistics.median(t_spec),
               "completion": tok.decode(a)}
        row["speedup"] = row["speculative_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print(f"prompt {i}: {len(a)} tokens, acceptance {row['acceptance_rate']:.3f}, plain "
              f"{row['plain_tokens_per_s']:.0f} tok/s, speculative {row['speculative_tokens_per_s']:.0f} tok/s "
              f"(x{row['speedup']:.2f})", flush=True)
    step_ms = step_costs(generate, cfg, variables, max_len)
    print(f"one step (median ms): {step_ms}", flush=True)
    load_after = loadavg()
    acc = sum(r["drafts_accepted"] for r in rows) / sum(r["verify_steps"] for r in rows)
    tokens = sum(r["new_tokens"] for r in rows)
    t_plain = sum(statistics.median(r["plain_s"]) for r in rows)
    t_spec = sum(statistics.median(r["speculative_s"]) for r in rows)
    summary = {"acceptance_rate": acc, "tokens": tokens,
               "main_model_calls_plain": tokens, "main_model_calls_speculative":
                   sum(r["verify_steps"] + 1 for r in rows),
               "plain_tokens_per_s": tokens / t_plain, "speculative_tokens_per_s": tokens / t_spec,
               "speedup": t_plain / t_spec, "speedup_median_of_prompts": statistics.median(r["speedup"] for r in rows)}
    print(json.dumps(summary, indent=1))

    if args.write:
        summ_path = os.path.join(args.run, "summary.json")
        run_summary = json.load(open(summ_path)) if os.path.exists(summ_path) else {}
        machine_rec = machine(load_before, load_after)
        out = {"command": cmd, "date": date, "git": git_rev(), "host_settings": host, "machine": machine_rec,
               "run": os.path.abspath(args.run), "step": step,
               "run_code_version": run_summary.get("code_version"), "run_validation": run_summary.get("validation"),
               "model_config": cfg.to_dict(), "settings": vars(args), "compile_s": compile_s, "summary": summary,
               "step_ms": step_ms,
               "rows": rows}
        val = run_summary.get("validation") or {}
        md = [
            "# MTP self-speculative decoding on the quickstart model (CPU)",
            "",
            f"Generated by `{cmd}` (git {out['git']}) on {date}; host settings (as the generate CLI): "
            f"{', '.join(h for h in host if h in compat.HOST_SETTINGS) or 'none'}.",
            "",
            f"- model: the quickstart run `{args.run}` (step {step}; trained by `python -m experiments.run "
            f"--config=experiments/configs/quickstart.py --config.loop.out_dir={args.run}`, code "
            f"{run_summary.get('code_version')}; validation loss {val.get('loss', float('nan')):.3f}, "
            f"{val.get('bpb', float('nan')):.3f} bits/byte); preset small with MTP depth 1, byte tokenizer",
            f"- prompts: the first {args.prompt_len} tokens of {len(prompts)} validation documents; up to "
            f"{args.new} new tokens each, greedy, stopping at EOS; batch 1",
            "- speculative: the MTP module drafts the token after next, the main model verifies both in one T=2 "
            "step (deepseek_jax/generate.py); outputs checked identical to plain greedy decoding for every prompt",
            f"- timing: compile excluded; per prompt, {args.rounds} rounds alternating plain and speculative, "
            "median; totals = all tokens / sum of per-prompt medians",
            *machine_lines(machine_rec),
            "",
            f"**Acceptance rate {acc:.3f}** ({sum(r['drafts_accepted'] for r in rows)} of "
            f"{sum(r['verify_steps'] for r in rows)} drafts); {tokens} tokens in "
            f"{summary['main_model_calls_speculative']} main-model calls instead of {tokens} "
            f"({tokens / summary['main_model_calls_speculative']:.2f} tokens per call); "
            f"**speed-up x{summary['speedup']:.2f}** ({summary['plain_tokens_per_s']:.0f} -> "
            f"{summary['speculative_tokens_per_s']:.0f} tokens/s).",
            "",
            f"Where the time goes (one jitted step, median of 50, ms): main model with 1 token "
            f"{step_ms['main_T1']} ({step_ms['moe_dispatch_T1']} MoE dispatch), main model with 2 tokens (verify) "
            f"{step_ms['main_T2']} ({step_ms['moe_dispatch_T2']}), MTP module with 2 tokens {step_ms['mtp_T2']}. "
            f"A speculative step costs (verify + MTP) / main_T1 = "
            f"{(step_ms['main_T2'] + step_ms['mtp_T2']) / step_ms['main_T1']:.2f} plain steps and yields "
            f"{(tokens - len(rows)) / (summary['main_model_calls_speculative'] - len(rows)):.2f} tokens (the first "
            "token of each prompt comes from the prefill). At batch 1 on a CPU "
            "the step time follows the weights it reads, and in this MoE most of them are routed experts: each "
            "token of the verify step reads its own top-k experts, so 2 tokens cost nearly 2 steps; speculation "
            "pays off only where a step's cost does not grow with its tokens (accelerators, large batches).",
            "",
            "| prompt | new tokens | acceptance | plain tok/s | speculative tok/s | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rows):
            md.append(f"| {i} | {r['new_tokens']} | {r['acceptance_rate']:.3f} | {r['plain_tokens_per_s']:.0f} | "
                      f"{r['speculative_tokens_per_s']:.0f} | {r['speedup']:.2f} |")
        md += ["", "Prompt 0 and its greedy completion:", "", "```", rows[0]["prompt"] + rows[0]["completion"],
               "```", ""]
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        write_result_files(os.path.join(results, "decode_speculative_quickstart"), out, "\n".join(md), indent=2)
    return summary


if __name__ == "__main__":
    main()
