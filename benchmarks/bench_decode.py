"""Decode throughput on CPU: this project (one jitted prefill + while_loop, absorbed MLA on the latent cache) vs
transformers' DeepseekV3ForCausalLM.generate (torch eager, its own DynamicCache), same weights, fp32.

Each contender runs in its own process (benchmarks/common.py: torch and XLA in one process slow each other down,
so the parent imports neither). Workers, `python -m benchmarks.bench_decode --worker=<spec-json>`:

    ours          initialises the model (model.init, std 0.02), writes it with hf.save_pretrained into a temporary
                  folder, applies the host settings the generate CLI applies (compat.use_cpu_settings), and
                  compiles generate.generate_batch for every batch size by an untimed first call
    transformers  starts after ours is ready: loads that folder with from_pretrained, one untimed warm-up call
                  per batch size
    provenance    (with --write) after the timing: the machine record and the result files

The model is the bench_train.py shape: vocab 4096, hidden 256, 4 layers (first dense, intermediate 704), 4 heads,
q_lora 128, kv_lora 64, qk_nope 32, qk_rope 16, v 32, 32 routed experts top-4 in 4 groups top-2, 1 shared, expert
width 128; no MTP (transformers' model has none).

Each contender continues `--batch` prompts of 16 random tokens (numpy default_rng(batch), the same in both
workers) by exactly `--new` tokens, greedy, no EOS (transformers: min_new_tokens = max_new_tokens,
do_sample=False). tokens/s = batch * new / wall time of the whole call (prefill included, compile excluded). In
each of `--rounds` rounds the parent asks each contender in turn for one call (the order alternates between rounds)
while the other blocks on its stdin, so a load change on a shared machine hits both; median of rounds.

Also reported: the cache bytes per token per layer of each, measured from the cache tensors (ours: the arrays of
generate.init_cache; transformers: the DynamicCache returned by generate), and how many greedy tokens the two agree
on (fp32 differences can flip a near-tie argmax, after which the sequences part).

    python -m benchmarks.bench_decode                       # print the table
    python -m benchmarks.bench_decode --write               # also write benchmarks/results/decode_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (WorkerError, add_worker_args, command_and_date, load_note, loadavg, provenance_setup,
                               serve, start)

MODULE = "benchmarks.bench_decode"  # what a worker process runs (python -m MODULE --worker=...)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=704,
             moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096)
PROMPT_LEN = 16


def prompts_for(batch: int) -> np.ndarray:
    """The [batch, PROMPT_LEN] random prompt tokens both contenders continue."""
    return np.random.default_rng(batch).integers(0, SHAPE["vocab_size"], (batch, PROMPT_LEN)).astype(np.int32)


def hf_cache_bytes_per_token_per_layer(cache) -> float:
    """Bytes of every tensor in a transformers Cache divided by layers * batch * cached tokens."""
    total, slots = 0, 0
    for layer in cache.layers:
        ts = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        total += sum(t.numel() * t.element_size() for t in ts)
        slots += ts[0].shape[0] * ts[0].shape[2]  # [batch, heads, tokens, dim]
    return total / slots


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------
def ours_setup(spec: dict):
    """Ours: the model, its HF checkpoint in spec["ckpt"], generate_batch compiled for every batch size."""
    if spec["threads"] == 1:  # before jax starts its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    from deepseek_jax import compat
    applied = compat.use_cpu_settings()  # what the generate CLI runs with
    import jax

    from deepseek_jax import generate, hf, model
    from deepseek_jax.config import ModelConfig

    cfg = ModelConfig(**SHAPE, num_nextn_predict_layers=0, routed_scaling_factor=2.5, rope_scaling=None,
                      initializer_range=0.02, bos_token_id=None, eos_token_id=None)
    variables = model.init(cfg, jax.random.PRNGKey(0), 8)
    hf.save_pretrained(cfg, variables, spec["ckpt"])

    def run(batch):
        return generate.generate_batch(cfg, variables, list(prompts_for(batch)), spec["new"])

    compile_s, cache = {}, {}
    for b in spec["batches"]:
        t0 = time.perf_counter()
        run(b)
        compile_s[b] = time.perf_counter() - t0
        cache[b] = generate.cache_bytes_per_token_per_layer(
            jax.eval_shape(lambda b=b: generate.init_cache(cfg, b, PROMPT_LEN + spec["new"], cfg.dtype)))
    mha_bytes = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4  # per-head k and v, fp32
    info = {"compile_plus_first_run_s": compile_s, "cache_bytes_per_token_per_layer": cache,
            "host": [a for a in applied if a in compat.HOST_SETTINGS], "jax": jax.__version__,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "gather_max_rows": generate.GATHER_MAX_ROWS,
            "decode_tile": generate.DECODE_TILE, "mha_cache_bytes_per_token_per_layer_fp32": mha_bytes,
            "head_dims": [cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                          cfg.qk_rope_head_dim]}
    return info, {"generate": lambda msg: timed(lambda: run(msg["batch"]),
                                                lambda out: [list(map(int, t)) for t in out])}


def hf_setup(spec: dict):
    """transformers: the checkpoint ours wrote, one warm-up call per batch size."""
    import torch
    import transformers
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ref = DeepseekV3ForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None

    def run(batch):
        ids = torch.as_tensor(prompts_for(batch), dtype=torch.long)
        with torch.inference_mode():
            return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new"],
                                min_new_tokens=spec["new"], do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True)

    cache = {b: hf_cache_bytes_per_token_per_layer(run(b).past_key_values) for b in spec["batches"]}
    info = {"cache_bytes_per_token_per_layer": cache, "attn_implementation": ref.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}
    return info, {"generate": lambda msg: timed(lambda: run(msg["batch"]),
                                                lambda out: out.sequences[:, PROMPT_LEN:].tolist())}


def timed(fn, tokens_of) -> dict:
    """One call's wall seconds and its generated tokens (``tokens_of(fn())``, outside the timed span)."""
    t0 = time.perf_counter()
    out = fn()
    s = time.perf_counter() - t0
    return {"s": s, "tokens": tokens_of(out)}


def worker(spec: dict) -> int:
    setups = {"ours": ours_setup, "hf": hf_setup, "provenance": provenance_setup}
    return serve(lambda: setups[spec["kind"]](spec))


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------
def agreeing(a, b) -> int:
    """How many leading tokens two sequences share."""
    return int(np.argmin(np.concatenate([np.asarray(a) == np.asarray(b), [False]])))


def time_rounds(workers: dict, batches, rounds: int, timeout: float) -> list:
    rows = []
    for b in batches:
        times, tokens = {k: [] for k in workers}, {}
        for r in range(rounds):
            for name in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
                out = workers[name].ask("generate", timeout, batch=b)
                times[name].append(out["s"])
                tokens.setdefault(name, out["tokens"])
            print(f"batch {b} round {r}: ours {times['ours'][-1]:.2f} s, transformers {times['hf'][-1]:.2f} s "
                  f"(load {loadavg()[0]})", flush=True)
        assert all(len(t) == len(tokens["ours"][0]) for k in tokens for t in tokens[k])
        new = len(tokens["ours"][0])
        rows.append({"batch": b, "new_tokens": new, "prompt_len": PROMPT_LEN,
                     "ours_tokens_per_s": b * new / statistics.median(times["ours"]),
                     "transformers_tokens_per_s": b * new / statistics.median(times["hf"]),
                     "speedup_median_of_rounds": statistics.median(t / o for o, t in zip(times["ours"], times["hf"])),
                     "ours_s": times["ours"], "transformers_s": times["hf"],
                     "greedy_tokens_agreeing_before_first_difference": [
                         agreeing(a, t) for a, t in zip(tokens["ours"], tokens["hf"])]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--new", type=int, default=256, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch.set_num_threads; with 1, XLA is made single-threaded too (XLA_FLAGS "
                         "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1)")
    add_worker_args(ap, 900, "benchmarks/results/decode_cpu.{md,json}")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    cmd, date = command_and_date(MODULE, argv)
    batches = [int(b) for b in args.batch.split(",")]
    load_before = loadavg()
    ckpt = tempfile.mkdtemp(prefix="bench_decode_")
    pool = []
    try:
        spec = {"ckpt": ckpt, "batches": batches, "new": args.new, "threads": args.threads}
        w_ours, ours = start("ours", MODULE, {**spec, "kind": "ours"}, args.timeout, pool, framework="jax")
        w_hf, theirs = start("transformers", MODULE, {**spec, "kind": "hf"}, args.timeout, pool, framework="torch")
        rows = time_rounds({"ours": w_ours, "hf": w_hf}, batches, args.rounds, args.timeout)
        for r in rows:
            b = str(r["batch"])  # JSON keys
            r["ours_compile_plus_first_run_s"] = ours["compile_plus_first_run_s"][b]
            r["ours_cache_bytes_per_token_per_layer"] = ours["cache_bytes_per_token_per_layer"][b]
            r["transformers_cache_bytes_per_token_per_layer"] = theirs["cache_bytes_per_token_per_layer"][b]
        load_after = loadavg()
        assert "jax" not in sys.modules and "torch" not in sys.modules, "the parent process must import no framework"
        table = markdown_table(rows)
        print("\n" + table)
        if args.write:
            extra = {"torch": theirs["torch"], "torch_threads": theirs["torch_threads"],
                     "transformers": theirs["transformers"]}
            w, prov = start("provenance", MODULE, {"kind": "provenance", "load_before": load_before,
                                                   "load_after": load_after, "extra": extra,
                                                   "note": load_note(load_before)},
                            args.timeout, pool)
            out = {"command": cmd, "date": date, "git": prov["git"], "machine": prov["machine"], "shape": SHAPE,
                   "rows": rows, "rounds": args.rounds, "ours": ours, "transformers": theirs,
                   "transformers_attn_implementation": theirs["attn_implementation"],
                   "mha_cache_bytes_per_token_per_layer_fp32": ours["mha_cache_bytes_per_token_per_layer_fp32"]}
            md = markdown(cmd, date, prov, args, ours, theirs, rows, table)
            w.ask("write", args.timeout, stem=os.path.join(RESULTS, "decode_cpu"), data=out, md=md)
    except WorkerError as e:
        sys.exit(f"bench_decode: {e}")
    finally:
        for w in pool:
            w.close()
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def markdown_table(rows) -> str:
    lines = ["| batch | new tokens | ours tok/s | transformers tok/s | x transformers (median of rounds) "
             "| cache B/token/layer ours | cache B/token/layer transformers | greedy tokens agreeing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tokens_per_s']:,.0f} | "
                     f"{r['transformers_tokens_per_s']:,.0f} | **{r['speedup_median_of_rounds']:.1f}** | "
                     f"{r['ours_cache_bytes_per_token_per_layer']:.0f} | "
                     f"{r['transformers_cache_bytes_per_token_per_layer']:.0f} | "
                     f"{r['greedy_tokens_agreeing_before_first_difference']} |")
    return "\n".join(lines)


def markdown(cmd, date, prov, args, ours, theirs, rows, table) -> str:
    heads, qk, v, kv_lora, rope = ours["head_dims"]
    return "\n".join([
        "# Decode throughput on CPU: deepseek_jax vs transformers DeepseekV3ForCausalLM.generate",
        "",
        f"Generated by `{cmd}` (git {prov['git']}) on {date}.",
        "",
        f"- model: {', '.join(f'{k}={v}' for k, v in SHAPE.items())}; no MTP; random weights (std 0.02), the same "
        f"for both (hf.save_pretrained -> from_pretrained); fp32",
        f"- method: each contender in its own process (`python -m benchmarks.bench_decode --worker=...`; the parent "
        f"imports neither jax nor torch), each compiled or warmed up alone; then {args.rounds} rounds, in each the "
        f"parent asks both contenders in turn (order alternating between rounds) for one call while the other "
        f"blocks; median of rounds",
        f"- task: {PROMPT_LEN}-token random prompts, exactly {args.new} new tokens each, greedy, no EOS; tokens/s = "
        f"batch x new tokens / wall time of the whole call (prefill included; ours compiled by an untimed first "
        f"call, transformers warmed up by one untimed call)",
        f"- ours (jax {ours['jax']}, XLA_FLAGS={ours['XLA_FLAGS']!r}; host settings, as the generate CLI: "
        f"{', '.join(ours['host']) or 'none'}): generate.generate_batch: one jit (naive-MLA prefill, then a "
        f"lax.while_loop of absorbed-MLA steps on the latent cache), moe_dispatch auto; decode steps routing <= "
        f"{ours['gather_max_rows']} rows (batch x top-k; batch 1 here) gather their experts' weights, larger ones "
        f"(batch 8) use {ours['decode_tile']}-row tiles",
        f"- transformers {theirs['transformers']} (torch {theirs['torch']}, {theirs['torch_threads']} threads, eager, "
        f"attn_implementation={theirs['attn_implementation']}): generate() with its DynamicCache. This version also "
        f"caches the compressed latent (kv_lora_rank + qk_rope_head_dim per token per layer, as the table shows) but "
        f"expands it through kv_b_proj into per-head keys and values for the whole sequence at every step; ours "
        f"attends on the latent directly (absorbed)",
        f"- a multi-head cache (per-head keys and values) of this shape would hold heads x (qk + v head dims) x 4 = "
        f"{heads} x ({qk} + {v}) x 4 = {ours['mha_cache_bytes_per_token_per_layer_fp32']} bytes per token per layer "
        f"in fp32; ours holds (kv_lora_rank + qk_rope_head_dim) x 4 = ({kv_lora} + {rope}) x 4 (DeepSeek-V3: 576 "
        f"numbers vs 40,960)",
        *prov["machine_lines"],
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
    ])


if __name__ == "__main__":
    rc = main()
    if isinstance(rc, int):
        sys.exit(rc)
