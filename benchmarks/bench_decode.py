"""Decode throughput on CPU: this project (one jitted prefill + while_loop, absorbed MLA on the latent cache) vs
transformers' DeepseekV3ForCausalLM.generate (torch eager, its own DynamicCache), same weights, fp32.

Issue 6 acceptance item. Same model for both, in the same process and the same run:

    the bench_train.py shape: vocab 4096, hidden 256, 4 layers (first dense, intermediate 704), 4 heads,
    q_lora 128, kv_lora 64, qk_nope 32, qk_rope 16, v 32, 32 routed experts top-4 in 4 groups top-2, 1 shared,
    expert width 128; no MTP (transformers' model has none); random weights (model.init, std 0.02), written
    with hf.save_pretrained and loaded by transformers' from_pretrained.

Each contender continues `--batch` prompts of 16 random tokens by exactly `--new` tokens, greedy, no EOS
(transformers: min_new_tokens = max_new_tokens, do_sample=False). tokens/s = batch * new / wall time of the
whole call (prefill included, compile excluded: ours is compiled by an untimed first call). Rounds alternate
the contenders so a load change on a shared machine hits both; median of `--rounds`.

Also reported: the cache bytes per token per layer of each, measured from the cache tensors (ours: the arrays
of generate.init_cache; transformers: the DynamicCache returned by generate), and how many greedy tokens the
two agree on (fp32 differences can flip a near-tie argmax, after which the sequences part).

    python -m benchmarks.bench_decode                       # print the table
    python -m benchmarks.bench_decode --write               # also write experiments/results/decode_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=704,
             moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096)
PROMPT_LEN = 16


from deepseek_jax.provenance import git_rev, loadavg, machine, machine_lines, write_result_files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def hf_cache_bytes_per_token_per_layer(cache) -> float:
    """Bytes of every tensor in a transformers Cache divided by layers * batch * cached tokens."""
    total, slots = 0, 0
    for layer in cache.layers:
        ts = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        total += sum(t.numel() * t.element_size() for t in ts)
        slots += ts[0].shape[0] * ts[0].shape[2]  # [batch, heads, tokens, dim]
    return total / slots


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--new", type=int, default=256, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch.set_num_threads; with 1, XLA is made single-threaded too (XLA_FLAGS "
                         "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1), the fair setting on a "
                         "loaded machine, where torch's OpenMP threads collapse under contention")
    ap.add_argument("--write", action="store_true", help="write experiments/results/decode_cpu.{md,json}")
    args = ap.parse_args(argv)
    if args.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()

    import jax
    import torch
    import transformers
    from transformers import DeepseekV3ForCausalLM

    from deepseek_jax import generate, hf, model
    from deepseek_jax.config import ModelConfig

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    load_before = loadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    cfg = ModelConfig(**SHAPE, num_nextn_predict_layers=0, routed_scaling_factor=2.5, rope_scaling=None,
                      initializer_range=0.02, bos_token_id=None, eos_token_id=None)
    variables = model.init(cfg, jax.random.PRNGKey(0), 8)
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    hf.save_pretrained(cfg, variables, tmp)
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    attn_impl = ref.config._attn_implementation

    rows = []
    for B in [int(b) for b in args.batch.split(",")]:
        rng = np.random.default_rng(B)
        prompts = rng.integers(0, cfg.vocab_size, (B, PROMPT_LEN)).astype(np.int32)
        ids = torch.as_tensor(prompts, dtype=torch.long)

        def ours():
            return generate.generate_batch(cfg, variables, list(prompts), args.new)

        def theirs():
            with torch.inference_mode():
                return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                                    return_dict_in_generate=True)

        t0 = time.perf_counter()
        out_ours = ours()
        compile_s = time.perf_counter() - t0
        out_theirs = theirs()  # warm-up
        cache_theirs = hf_cache_bytes_per_token_per_layer(out_theirs.past_key_values)
        cache_ours = generate.cache_bytes_per_token_per_layer(
            jax.eval_shape(lambda: generate.init_cache(cfg, B, PROMPT_LEN + args.new, cfg.dtype)))
        seq_theirs = out_theirs.sequences[:, PROMPT_LEN:].numpy()
        agree = [int(np.argmin(np.concatenate([a == b, [False]]))) for a, b in zip(out_ours, seq_theirs)]
        assert all(len(a) == args.new for a in out_ours) and seq_theirs.shape == (B, args.new)
        times = {"ours": [], "transformers": []}
        for r in range(args.rounds):
            for name, fn in (("ours", ours), ("transformers", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            print(f"batch {B} round {r}: ours {times['ours'][-1]:.2f} s, transformers "
                  f"{times['transformers'][-1]:.2f} s (load {loadavg()[0]})", flush=True)
        tps = {k: B * args.new / statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(t / o for o, t in zip(times["ours"], times["transformers"]))
        row = {"batch": B, "new_tokens": args.new, "prompt_len": PROMPT_LEN,
               "ours_tokens_per_s": tps["ours"], "transformers_tokens_per_s": tps["transformers"],
               "speedup_median_of_rounds": ratio, "ours_s": times["ours"], "transformers_s": times["transformers"],
               "ours_compile_plus_first_run_s": compile_s, "ours_cache_bytes_per_token_per_layer": cache_ours,
               "transformers_cache_bytes_per_token_per_layer": cache_theirs,
               "greedy_tokens_agreeing_before_first_difference": agree}
        rows.append(row)
        print(f"batch {B}: ours {tps['ours']:.0f} tok/s, transformers {tps['transformers']:.0f} tok/s, "
              f"x{ratio:.2f}; cache bytes/token/layer ours {cache_ours:.0f}, transformers {cache_theirs:.0f}; "
              f"greedy agreement (tokens before first difference) {agree}", flush=True)
    load_after = loadavg()

    per_layer_mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4  # per-head k and v, fp32
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = ["| batch | new tokens | ours tok/s | transformers tok/s | x transformers (median of rounds) "
             "| cache B/token/layer ours | cache B/token/layer transformers | greedy tokens agreeing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tokens_per_s']:,.0f} | "
                     f"{r['transformers_tokens_per_s']:,.0f} | **{r['speedup_median_of_rounds']:.1f}** | "
                     f"{r['ours_cache_bytes_per_token_per_layer']:.0f} | "
                     f"{r['transformers_cache_bytes_per_token_per_layer']:.0f} | "
                     f"{r['greedy_tokens_agreeing_before_first_difference']} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        machine_rec = machine(load_before, load_after, torch=torch.__version__,
                                torch_threads=torch.get_num_threads(), transformers=transformers.__version__)
        rev = git_rev()
        out = {"command": cmd, "date": date, "git": rev, "machine": machine_rec, "shape": SHAPE, "rows": rows,
               "rounds": args.rounds, "transformers_attn_implementation": attn_impl,
               "mha_cache_bytes_per_token_per_layer_fp32": per_layer_mha}
        md = [
            "# Decode throughput on CPU: deepseek_jax vs transformers DeepseekV3ForCausalLM.generate",
            "",
            f"Generated by `{cmd}` (git {rev}) on {date}.",
            "",
            f"- model: {', '.join(f'{k}={v}' for k, v in SHAPE.items())}; no MTP; random weights (std 0.02), the "
            f"same for both (hf.save_pretrained -> from_pretrained); fp32",
            f"- task: {PROMPT_LEN}-token random prompts, exactly {args.new} new tokens each, greedy, no EOS; "
            f"tokens/s = batch x new tokens / wall time of the whole call (prefill included; ours compiled by an "
            f"untimed first call, transformers warmed up by one untimed call); median of {args.rounds} rounds, "
            f"contenders alternating within a round",
            f"- ours: generate.generate_batch: one jit (naive-MLA prefill, then a lax.while_loop of absorbed-MLA "
            f"steps on the latent cache), moe_dispatch auto: sorted_tiles on CPU for the prefill; decode steps "
            f"routing <= {generate.GATHER_MAX_ROWS} rows (batch x top-k; batch 1 here) gather their experts' "
            f"weights, larger ones (batch 8) use {generate.DECODE_TILE}-row tiles",
            f"- transformers {transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, eager, attn_implementation={attn_impl}): generate() with its DynamicCache. This version "
            f"also caches the compressed latent (kv_lora_rank + qk_rope_head_dim per token per layer, as the "
            f"table shows) but expands it through kv_b_proj into per-head keys and values for the whole sequence "
            f"at every step; ours attends on the latent directly (absorbed)",
            f"- a multi-head cache (per-head keys and values) of this shape would hold heads x (qk + v head dims) "
            f"x 4 = {cfg.num_attention_heads} x ({cfg.qk_head_dim} + {cfg.v_head_dim}) x 4 = {per_layer_mha} "
            f"bytes per token per layer in fp32; ours holds (kv_lora_rank + qk_rope_head_dim) x 4 = "
            f"({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x 4 (DeepSeek-V3: 576 numbers vs 40,960)",
            *machine_lines(machine_rec),
            "",
            table,
            "",
            "Per-round wall times (s): " + "; ".join(
                f"batch {r['batch']}: ours {', '.join(f'{t:.2f}' for t in r['ours_s'])} / transformers "
                f"{', '.join(f'{t:.2f}' for t in r['transformers_s'])}" for r in rows),
            "",
            "'greedy tokens agreeing': per row, how many leading generated tokens are identical between the two "
            "implementations (fp32 rounding differs, so a near-tie argmax can flip and the sequences part after).",
            "",
        ]
        write_result_files(os.path.join(RESULTS, "decode_cpu"), out, "\n".join(md), indent=2)
    return rows


if __name__ == "__main__":
    main()
