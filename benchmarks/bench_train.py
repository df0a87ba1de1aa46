"""Train-step throughput on CPU: this project (JAX, jit) vs transformers' DeepseekV3ForCausalLM (torch eager, AdamW).

Each contender runs in its own process: torch and XLA in one process slow each other down (torch's OpenMP threads
up to 17x), so the parent imports neither. It starts one worker per contender (`python -m benchmarks.bench_train
--worker=<spec-json>`, cwd the repository root) and talks to it over its stdin/stdout, one JSON object a line:

    worker -> {"ready": true, ...}       after build, compile and `--warmup` untimed steps (compile seconds, param
                                         counts, FLOP accounting, versions, threads)
    {"cmd": "step"}    -> {"s": seconds, "loss": float}    one full step, blocking until it is done
    {"cmd": "peak"}    -> fp32 2048^3 matmul, median and best of 5 (jnp.dot in ours, torch.mm in transformers')
    {"cmd": "profile"} -> ours only: benchmarks.profile_ops.op_breakdown of the compiled step (by group, top ops)
    {"cmd": "quit"}

Workers start one after another (each compiles and warms up alone). Then `--steps` rounds: in each, the parent
sends `step` to every contender in turn and waits for its time, so exactly one contender computes at any moment
(the others block on their stdin) and a load change on a shared machine hits every contender alike. Threads:
torch.set_num_threads(os.cpu_count()) (`--threads` overrides), XLA its default (every core).

Two shapes (`--shape`), each its own table; fp32, no MTP (transformers' model has none; `--mtp` also times ours
with one MTP module, which does strictly more work):

    bench  vocab 4096, hidden 256, 4 layers (first dense, intermediate 704), 4 heads, q_lora 128, kv_lora 64,
           qk_nope 32, qk_rope 16, v 32, 32 routed experts top-4 in 4 groups top-2, 1 shared, expert width 128;
           batch 8 x seq 256 (2,048 tokens a step)
    base   the experiments' base model: preset "small" with experiments/configs/base.py's BASE_MODEL (vocab 259,
           hidden 128, 3 layers, 16 routed experts top-4, expert width 64, ...); batch 8 x seq 128 (1,024 tokens)

Ours: `preset("small", **shape)` (so the preset's execution policy, e.g. scan_unroll, applies) with no BOS/EOS, no
YaRN and `--dispatch`; `make_train_step(cfg, default_train_config())` (AdamW, clip 1.0, seq-wise balance loss
alpha 1e-4, aux-loss-free bias update, non-finite skip), jit with donate_argnums=0, batch {"tokens": int32
[1, B, T+1]}. transformers: DeepseekV3Config from the same fields (num_key_value_heads = heads, no MTP, untied
head), `model(input_ids, labels=input_ids).loss`, backward, clip_grad_norm_(1.0), AdamW(betas (0.9, 0.95),
weight_decay 0.1).step(), zero_grad(). Both get the same random tokens; parameter counts are checked equal.

Timing: tokens/s from the median step time; the ratio to transformers (its fastest experts implementation) as the
median of per-round ratios, and best / best. Load average is recorded before, after and every round.

MFU: model FLOPs per token = 6 * N_act + 6 * L * T * H * (d_qk + d_v)
  N_act = count_params(cfg)["activated"]: every matmul weight one token uses (output head included, input
          embedding excluded, k of E routed experts per MoE layer; router and norms included, negligible),
  the second term = QK^T and PV, forward 2*T*H*(d_qk + d_v) per token per layer, x3 for fwd+bwd, counted over
  the full T x T score matrix (PaLM convention; causal masking halves the useful part), d_qk = nope + rope.
Peak: median fp32 GFLOP/s of a 2048^3 matmul, measured per shape by the workers themselves (jnp.dot, torch.mm).

`--profile`: after the rounds, where our step's time goes, per HLO op (benchmarks/profile_ops.py), by group and
the top 25 ops. Thunk times overlap (XLA:CPU runs independent thunks concurrently): their sum may exceed the step.

    python -m benchmarks.bench_train                        # both shapes, print the tables
    python -m benchmarks.bench_train --shape=base --profile # the base model only, with our step's op breakdown
    python -m benchmarks.bench_train --mtp --write          # also with MTP; write benchmarks/results/bench_train_cpu.*
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

from benchmarks.common import (REPO_ROOT, WorkerError, add_worker_args, command_and_date, load_note, loadavg,
                               provenance_setup, serve, start)

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
BASE_CONFIG = os.path.join(REPO_ROOT, "experiments", "configs", "base.py")

SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=704,
             moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096)
MODULE = "benchmarks.bench_train"  # what a worker process runs (python -m MODULE --worker=...)
BATCH, SEQ = 8, 256
BASE_BATCH, BASE_SEQ = 8, 128
PEAK_N, PEAK_REPS = 2048, 5
PROFILE_REPS, PROFILE_TOP = 3, 25
# the ModelConfig fields transformers' DeepseekV3Config takes under the same name (the architecture)
HF_FIELDS = tuple(SHAPE) + ("routed_scaling_factor", "rms_norm_eps", "rope_theta")


# ---------------------------------------------------------------------------------------------------------------
# Shapes (resolved in the parent, passed to every worker in its spec)
# ---------------------------------------------------------------------------------------------------------------
def base_model_fields() -> dict:
    """experiments/configs/base.py's BASE_MODEL, read from its source: importing the module would import jax."""
    with open(BASE_CONFIG) as f:
        tree = ast.parse(f.read(), BASE_CONFIG)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BASE_MODEL" for t in node.targets):
            v = node.value
            if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "dict" and not v.args:
                return {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
            return dict(ast.literal_eval(v))
    raise RuntimeError(f"{BASE_CONFIG}: no BASE_MODEL assignment")


def shape_spec(name: str) -> dict:
    """{"name", "fields" (ModelConfig fields over preset "small"), "batch", "seq", "about"}."""
    if name == "bench":
        return {"name": "bench", "fields": dict(SHAPE), "batch": BATCH, "seq": SEQ,
                "about": "the benchmark shape (preset small with SHAPE)"}
    if name == "base":
        fields = {k: v for k, v in base_model_fields().items() if k != "num_nextn_predict_layers"}
        return {"name": "base", "fields": fields, "batch": BASE_BATCH, "seq": BASE_SEQ,
                "about": "the experiments' base model (preset small with experiments/configs/base.py BASE_MODEL)"}
    raise ValueError(f"unknown shape {name!r}")


def model_config(shape: dict, mtp: int = 0, dispatch: str = "auto"):
    """Our ModelConfig for a shape (deepseek_jax.config imports no jax, so the torch worker uses it too)."""
    from deepseek_jax.config import preset
    return preset("small", **{**shape["fields"], "num_nextn_predict_layers": mtp, "rope_scaling": None,
                              "bos_token_id": None, "eos_token_id": None, "moe_dispatch": dispatch})


def batch_tokens(shape: dict):
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.integers(0, model_config(shape).vocab_size, size=(shape["batch"], shape["seq"] + 1), dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs (in our worker: count_params imports jax)
# ---------------------------------------------------------------------------------------------------------------
def flops_per_token(cfg, with_mtp: bool, seq: int):
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
    attn = 6 * layers * seq * cfg.num_attention_heads * (d_qk + cfg.v_head_dim)
    return {"activated_params": n_act, "total_params": c["total"], "mtp_params": c["mtp"],
            "dense_flops": 6 * n_act, "attn_flops": attn, "flops_per_token": 6 * n_act + attn}


# ---------------------------------------------------------------------------------------------------------------
# Contenders (in the workers): each step() runs one full step and blocks until it is done
# ---------------------------------------------------------------------------------------------------------------
def build_ours(shape: dict, mtp: int, dispatch: str):
    import jax
    import jax.numpy as jnp
    from deepseek_jax.train.step import default_train_config, init_train_state, make_train_step

    cfg = model_config(shape, mtp, dispatch)
    tc = default_train_config(total_steps=1000)
    state = init_train_state(cfg, tc, jax.random.PRNGKey(0), seq_len=shape["seq"])
    batch = {"tokens": jnp.asarray(batch_tokens(shape)[None], jnp.int32)}  # [1, B, T+1]
    fn = jax.jit(make_train_step(cfg, tc), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "loss": None}

    def step():
        box["state"], m = compiled(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        box["loss"] = float(m["loss"])

    return cfg, step, box, compile_s, compiled


def build_hf(shape: dict, attn: str, experts: str):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = model_config(shape)
    torch.manual_seed(0)
    hcfg = DeepseekV3Config(**{k: getattr(cfg, k) for k in HF_FIELDS}, num_key_value_heads=cfg.num_attention_heads,
                            num_nextn_predict_layers=0, tie_word_embeddings=False, attention_dropout=0.0,
                            use_cache=False, rope_scaling=None)
    kw = {} if experts == "default" else {"experts_implementation": experts}
    model = DeepseekV3ForCausalLM._from_config(hcfg, attn_implementation=attn, dtype=torch.float32, **kw)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.as_tensor(batch_tokens(shape)[:, :shape["seq"]], dtype=torch.long)
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


def peak_stats(ts, name: str) -> dict:
    fl = 2 * PEAK_N ** 3
    return {"op": name, "n": PEAK_N, "reps": PEAK_REPS, "gflops": fl / statistics.median(ts) / 1e9,
            "gflops_max": fl / min(ts) / 1e9}


def jax_matmul_peak() -> dict:
    import jax
    import jax.numpy as jnp
    from benchmarks.common import time_calls
    a = jax.random.normal(jax.random.PRNGKey(0), (PEAK_N, PEAK_N), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (PEAK_N, PEAK_N), jnp.float32)
    f = jax.jit(jnp.dot)
    return peak_stats(time_calls(lambda: f(a, b), PEAK_REPS), "jnp.dot")


def torch_matmul_peak() -> dict:
    import torch
    from benchmarks.common import time_calls
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return peak_stats(time_calls(lambda: torch.mm(a, b), PEAK_REPS, sync=lambda r: r), "torch.mm")


def profile_step(compiled, step) -> dict:
    from benchmarks.profile_ops import by_group, op_breakdown
    rows = op_breakdown(compiled, step, reps=PROFILE_REPS)
    return {"reps": PROFILE_REPS, "n_ops": len(rows), "sum_ms": sum(r["ms"] for r in rows),
            "by_group": [list(g) for g in by_group(rows)], "top": rows[:PROFILE_TOP]}


# ---------------------------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------------------------
def worker(spec: dict) -> int:
    """Serve one contender (spec["kind"]: ours | hf | provenance) over stdin/stdout until quit or EOF
    (benchmarks/common.py: the protocol)."""
    return serve(lambda: provenance_setup(spec) if spec["kind"] == "provenance" else contender_setup(spec))


def contender_setup(spec: dict):
    """Build, compile and warm up one contender; its ready info and its commands (step, peak, profile)."""
    kind = spec["kind"]
    handlers = {}
    shape = spec["shape"]
    if spec.get("root"):  # --baseline: this contender's deepseek_jax comes from another checkout
        sys.path.insert(0, spec["root"])
    if kind == "ours":
        from deepseek_jax import compat
        applied = []
        if spec.get("xla_flags") is not None:  # --xla-flags: exactly these
            os.environ["XLA_FLAGS"] = spec["xla_flags"]
            os.environ[compat.NO_CPU_FLAGS_ENV] = "1"
        elif spec.get("cpu_flags", True) and spec.get("host", True) and hasattr(compat, "use_cpu_settings"):
            applied = compat.use_cpu_settings()  # what experiments.run and the notebooks run with
        elif spec.get("cpu_flags", True):  # --host-defaults (or a baseline checkout from before the settings)
            compat.use_cpu_xla_flags()
        else:
            os.environ[compat.NO_CPU_FLAGS_ENV] = "1"
        import jax
        import jaxlib
        cfg, step, box, compile_s, compiled = build_ours(shape, spec["mtp"], spec["dispatch"])
        fl = flops_per_token(cfg, bool(spec["mtp"]), shape["seq"])
        from deepseek_jax.provenance import git_rev
        info = {"compile_s": compile_s, "flops": fl, "total_params": fl["total_params"],
                "code": git_rev(os.path.dirname(os.path.dirname(compat.__file__))),
                "activated_params": fl["activated_params"], "scan_unroll": cfg.scan_unroll,
                "moe_dispatch": cfg.moe_dispatch, "mtp": cfg.num_nextn_predict_layers,
                "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
                "threads": {"xla": f"default (all {os.cpu_count()} cores)",
                            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
                "host": [a for a in applied if a in getattr(compat, "HOST_SETTINGS", ())]}
        handlers["peak"] = lambda msg: jax_matmul_peak()
        handlers["profile"] = lambda msg: profile_step(compiled, step)
    elif kind == "hf":
        import torch
        import transformers
        torch.set_num_threads(spec["threads"] or os.cpu_count())
        host = []
        if spec.get("malloc"):  # --hf-malloc: the malloc settings our entry points apply, for torch too
            from deepseek_jax import host as host_lib  # the standard library only: no jax
            host = [host_lib.SETTINGS] if host_lib.keep_freed_memory() else []
        t0 = time.perf_counter()
        step, box, info = build_hf(shape, spec["attn"], spec["experts"])
        info["build_s"] = time.perf_counter() - t0
        info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        info["threads"] = {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}
        info["host"] = host
        handlers["peak"] = lambda msg: torch_matmul_peak()
    else:
        raise ValueError(f"unknown worker kind {kind!r}")
    warm = []
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
        warm.append(box["loss"])
    info["warmup_s"] = time.perf_counter() - t0
    info["warmup_losses"] = warm

    def do_step(msg):
        t = time.perf_counter()
        step()
        return {"s": time.perf_counter() - t, "loss": box["loss"]}

    handlers["step"] = do_step
    return info, handlers


# ---------------------------------------------------------------------------------------------------------------
# Parent: one shape
# ---------------------------------------------------------------------------------------------------------------
def run_shape(shape: dict, args) -> dict:
    tokens = shape["batch"] * shape["seq"]
    specs = [("deepseek_jax (no MTP)", {"kind": "ours", "mtp": 0, "cpu_flags": True})]
    if args.host_defaults:
        specs.append(("deepseek_jax (no MTP, host defaults: asynchronous dispatch, glibc's malloc defaults)",
                      {"kind": "ours", "mtp": 0, "cpu_flags": True, "host": False}))
    if args.xla_defaults:
        specs.append(("deepseek_jax (no MTP, XLA's default flags)", {"kind": "ours", "mtp": 0, "cpu_flags": False}))
    for flags in (args.xla_flags.split(";") if args.xla_flags else []):
        specs.append((f"deepseek_jax (no MTP, XLA_FLAGS={flags.strip()!r})",
                      {"kind": "ours", "mtp": 0, "xla_flags": flags.strip()}))
    for root in (args.baseline.split(",") if args.baseline else []):
        specs.append((f"deepseek_jax (no MTP) at the baseline checkout {root}",
                      {"kind": "ours", "mtp": 0, "cpu_flags": True, "root": os.path.abspath(root), "label": root}))
    if args.mtp:
        specs.append(("deepseek_jax (MTP D=1)", {"kind": "ours", "mtp": 1, "cpu_flags": True}))
    for experts in args.experts.split(","):
        specs.append((f"transformers (experts={experts})", {"kind": "hf", "attn": args.attn, "experts": experts,
                                                             "threads": args.threads}))
        if args.hf_malloc:
            specs.append((f"transformers (experts={experts}, malloc settings)",
                          {"kind": "hf", "attn": args.attn, "experts": experts, "threads": args.threads,
                           "malloc": True}))
    load_before = loadavg()
    print(f"\n== shape {shape['name']}: {shape['about']}; batch {shape['batch']} x seq {shape['seq']} "
          f"(load {load_before})", flush=True)
    pool, contenders = [], []  # contenders: (name, worker, ready info)
    try:
        for name, spec in specs:
            w, info = start(name, MODULE, {**spec, "shape": shape, "dispatch": args.dispatch, "warmup": args.warmup},
                            args.timeout, pool, framework="jax" if spec["kind"] == "ours" else "torch")
            if spec["kind"] == "hf":
                name = w.name = (f"transformers DeepseekV3ForCausalLM (torch eager, attn={info['attn_implementation']}"
                                 f", experts={info['experts_implementation']}"
                                 + (f", {' '.join(info['host'])}" if info["host"] else "") + ")")
                print(f"ready: {name}: built in {info['build_s']:.1f} s, {info['threads']['torch']} torch threads, "
                      f"params {info['total_params']:,}, warmup losses {info['warmup_losses']}", flush=True)
            else:
                if spec.get("root"):
                    name = w.name = f"deepseek_jax (no MTP) at code {info['code']} (--baseline {spec['label']})"
                print(f"ready: {name}: compiled in {info['compile_s']:.1f} s, params total {info['total_params']:,} "
                      f"activated {info['activated_params']:,}, scan_unroll {info['scan_unroll']}, moe_dispatch "
                      f"{info['moe_dispatch']}, warmup losses {info['warmup_losses']}", flush=True)
            contenders.append((name, w, {**spec, **info}))

        ours = contenders[0][2]
        hf_rows = [c for c in contenders if c[2]["kind"] == "hf"]
        params = {"ours": ours["total_params"], "transformers": hf_rows[0][2]["total_params"]}
        params["equal"] = params["ours"] == params["transformers"] and all(
            c[2]["total_params"] == params["ours"] for c in hf_rows)
        print(f"params: ours {params['ours']:,}, transformers {params['transformers']:,} "
              f"({'equal' if params['equal'] else 'DIFFERENT: not a like-for-like comparison'})", flush=True)

        jp = contenders[0][1].ask("peak", args.timeout)
        tp = hf_rows[0][1].ask("peak", args.timeout)
        peak = {"jax_gflops": jp["gflops"], "jax_gflops_max": jp["gflops_max"], "torch_gflops": tp["gflops"],
                "torch_gflops_max": tp["gflops_max"], "n": PEAK_N, "reps": PEAK_REPS}
        print(f"matmul peak fp32 {PEAK_N}^3: jnp.dot {peak['jax_gflops']:.1f} GFLOP/s (best "
              f"{peak['jax_gflops_max']:.1f}), torch.mm {peak['torch_gflops']:.1f} GFLOP/s (best "
              f"{peak['torch_gflops_max']:.1f})", flush=True)

        times = {name: [] for name, *_ in contenders}
        losses = {name: None for name, *_ in contenders}
        round_load = []
        for r in range(args.steps):
            line = []
            for name, w, _ in contenders:
                res = w.ask("step", args.timeout)
                times[name].append(res["s"])
                losses[name] = res["loss"]
                line.append(f"{res['s'] * 1e3:.0f} ms")
            round_load.append(loadavg())
            print(f"round {r}: " + ", ".join(line) + f"  (load {round_load[-1][0]})", flush=True)
        load_after = loadavg()

        profiles = {}
        if args.profile:
            for name, w, info in contenders:
                if info["kind"] == "ours":
                    print(f"profiling {name} ({PROFILE_REPS} steps under jax.profiler)", flush=True)
                    profiles[name] = w.ask("profile", args.timeout)
    finally:
        for w in pool:
            w.close()

    # the baseline: the fastest transformers contender (median step), so the ratio is never flattered
    hf_name = min((c[0] for c in hf_rows), key=lambda n: statistics.median(times[n]))
    rows = []
    for name, _, info in contenders:
        ts = times[name]
        med = statistics.median(ts)
        tps = tokens / med
        achieved = tps * ours["flops"]["flops_per_token"] / 1e9 if info["kind"] == "hf" else \
            tps * info["flops"]["flops_per_token"] / 1e9
        ratios = [h / t for h, t in zip(times[hf_name], ts)]
        keep = {k: info[k] for k in ("kind", "mtp", "compile_s", "build_s", "total_params", "activated_params",
                                     "scan_unroll", "moe_dispatch", "attn_implementation", "experts_implementation",
                                     "threads", "versions", "warmup_losses", "code", "host") if k in info}
        rows.append({"name": name, "step_ms_median": med * 1e3, "step_ms_min": min(ts) * 1e3,
                     "step_ms_all": [t * 1e3 for t in ts], "tokens_per_s": tps, "tokens_per_s_best": tokens / min(ts),
                     "speedup_vs_transformers": statistics.median(ratios),
                     "speedup_best": min(times[hf_name]) / min(ts), "gflops": achieved,
                     "mfu_vs_jax_peak": achieved / peak["jax_gflops"],
                     "mfu_vs_torch_peak": achieved / peak["torch_gflops"], "final_loss": losses[name], **keep})
    # Roofline of the 2x goal: the FLOP rate a step needs to be twice as fast as transformers' fastest step, against
    # the fastest fp32 matmul this machine ran for this shape (no model step can beat its own matmuls).
    hf_best_tps = tokens / min(times[hf_name])
    goal = {"goal_tokens_per_s": 2 * hf_best_tps,
            "needed_gflops": 2 * hf_best_tps * ours["flops"]["flops_per_token"] / 1e9,
            "peak_gflops_best": max(peak["jax_gflops_max"], peak["torch_gflops_max"])}
    goal["needed_fraction_of_peak"] = goal["needed_gflops"] / goal["peak_gflops_best"]
    mtp_info = next((c[2] for c in contenders if c[2]["kind"] == "ours" and c[2]["mtp"]), None)
    return {"shape": {**shape, "tokens_per_step": tokens}, "params": params, "peak": peak, "flops": ours["flops"],
            "flops_mtp": mtp_info["flops"] if mtp_info else None, "rows": rows, "baseline": hf_name, "goal": goal,
            "load_before": load_before, "load_after": load_after, "round_load": round_load, "profiles": profiles,
            "versions": {k: v for c in contenders for k, v in c[2]["versions"].items()},
            "threads": {k: v for c in contenders for k, v in c[2]["threads"].items()}}


# ---------------------------------------------------------------------------------------------------------------
# Parent: markdown
# ---------------------------------------------------------------------------------------------------------------
def shape_markdown(res: dict) -> list:
    s, fl, peak, goal = res["shape"], res["flops"], res["peak"], res["goal"]
    header = ("| contender | step ms (median) | step ms (min) | tokens/s | x transformers (median of per-round) "
              "| x transformers (best / best) | model GFLOP/s | MFU vs jnp.dot peak | MFU vs torch.mm peak |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['step_ms_median']:.0f} | {r['step_ms_min']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"**{r['speedup_vs_transformers']:.2f}** | {r['speedup_best']:.2f} | {r['gflops']:.1f} | "
                     f"{100 * r['mfu_vs_jax_peak']:.1f}% | {100 * r['mfu_vs_torch_peak']:.1f}% |")
    ours = res["rows"][0]
    p = res["params"]
    md = [f"## Shape `{s['name']}`: {s['about']}", "",
          f"- fields over preset small: {', '.join(f'{k}={v}' for k, v in s['fields'].items())}; batch {s['batch']} "
          f"x seq {s['seq']} = {s['tokens_per_step']} tokens/step; fp32; ours scan_unroll={ours['scan_unroll']}, "
          f"moe_dispatch={ours['moe_dispatch']}",
          f"- params: ours {p['ours']:,}, transformers {p['transformers']:,} "
          f"({'equal' if p['equal'] else 'DIFFERENT: not a like-for-like comparison'})",
          f"- FLOPs/token = 6 * {fl['activated_params']:,} + {fl['attn_flops']:,} = {fl['flops_per_token'] / 1e6:.2f} "
          f"MFLOP" + (f"; MTP row {res['flops_mtp']['flops_per_token'] / 1e6:.2f} MFLOP" if res["flops_mtp"] else ""),
          f"- peak: fp32 {peak['n']}^3 matmul, median of {peak['reps']}: jnp.dot {peak['jax_gflops']:.1f} GFLOP/s "
          f"(best {peak['jax_gflops_max']:.1f}), torch.mm {peak['torch_gflops']:.1f} GFLOP/s "
          f"(best {peak['torch_gflops_max']:.1f})",
          f"- load average: before {res['load_before']}, after {res['load_after']}; after each round (1 min): "
          f"{', '.join(str(x[0]) for x in res['round_load'])}",
          "", *lines, "",
          f"Roofline of the 2x goal: 2 x transformers' best step = {goal['goal_tokens_per_s']:,.0f} tokens/s "
          f"= {goal['needed_gflops']:.1f} GFLOP/s of model FLOPs, i.e. {100 * goal['needed_fraction_of_peak']:.0f}% "
          f"of the fastest fp32 {peak['n']}^3 matmul measured for this shape ({goal['peak_gflops_best']:.1f} GFLOP/s).",
          "",
          "Per-step times (ms): " + "; ".join(
              f"{r['name']}: " + ", ".join(f"{t:.0f}" for t in r["step_ms_all"]) for r in res["rows"]),
          ""]
    for name, prof in res["profiles"].items():
        step_ms = next(r["step_ms_median"] for r in res["rows"] if r["name"] == name)
        md += [f"### Where the step goes: {name}", "",
               f"jax.profiler over {prof['reps']} steps, per step; {prof['n_ops']} HLO ops, their thunk times sum to "
               f"{prof['sum_ms']:.0f} ms against a {step_ms:.0f} ms median step. Thunk times overlap (XLA:CPU runs "
               f"independent thunks concurrently), so the per-op sum may exceed the step.", "",
               "| group | fwd ms | bwd ms | other ms | total ms |", "|---|---|---|---|---|"]
        md += [f"| {g} | {f:.1f} | {b:.1f} | {o:.1f} | {t:.1f} |" for g, f, b, o, t in prof["by_group"]]
        md += ["", f"Top {len(prof['top'])} ops:", "", "| ms | calls | opcode | group | op (JAX path) |",
               "|---|---|---|---|---|"]
        md += [f"| {r['ms']:.2f} | {r['calls']:g} | {r['opcode']} | {r['group']} | `{r['path'] or r['hlo']}` |"
               for r in prof["top"]]
        md.append("")
    return md


METHOD = "each contender in its own process, rounds interleaved, one contender computing at a time"


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="both", choices=["bench", "base", "both"], help="which shape(s) to time")
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender after compile")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attn_implementation")
    ap.add_argument("--experts", default="default",
                    help="comma list of transformers experts_implementation to time, each its own worker (default: "
                         "the library's, grouped_mm in 5.x; e.g. default,eager); the fastest is the ratio's baseline")
    ap.add_argument("--mtp", action="store_true", help="also time ours with num_nextn_predict_layers=1")
    ap.add_argument("--xla-flags", default="",
                    help="';'-separated XLA_FLAGS settings, each timed as one more of our contenders (flag studies)")
    ap.add_argument("--host-defaults", action="store_true",
                    help="also time ours without compat.use_cpu_settings' host settings (asynchronous dispatch, "
                         "glibc's malloc defaults)")
    ap.add_argument("--hf-malloc", action="store_true",
                    help="also time transformers under the malloc settings our entry points apply (deepseek_jax.host)")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="also time ours without deepseek_jax.compat.CPU_XLA_FLAGS (XLA's own CPU defaults)")
    ap.add_argument("--dispatch", default="auto",
                    help="our moe_dispatch (auto on CPU = bucket_tiles at these expert widths)")
    ap.add_argument("--baseline", default="",
                    help="other checkouts, comma-separated (e.g. git worktrees of earlier commits): the deepseek_jax "
                         "of each is timed as one more contender, in its own process and rounds like the others (an "
                         "A/B of a change)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: os.cpu_count())")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, our step's per-op breakdown (benchmarks/profile_ops.py)")
    add_worker_args(ap, 1800, "benchmarks/results/bench_train_cpu.{md,json}")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    cmd, date = command_and_date(MODULE, argv)
    load_before = loadavg()
    print(f"load average before: {load_before}; {METHOD}", flush=True)
    results = {}
    try:
        for name in (["bench", "base"] if args.shape == "both" else [args.shape]):
            results[name] = run_shape(shape_spec(name), args)
    except WorkerError as e:
        sys.exit(f"bench_train: {e}")
    load_after = loadavg()
    assert "jax" not in sys.modules and "torch" not in sys.modules, "the parent process must import no framework"

    versions = {k: v for res in results.values() for k, v in res["versions"].items()}
    threads = {k: v for res in results.values() for k, v in res["threads"].items()}
    threads_line = (f"torch {threads['torch']} threads (set_num_threads; interop {threads['torch_interop']}), "
                    f"XLA {threads['xla']}, XLA_FLAGS={threads['XLA_FLAGS']!r}")
    for res in results.values():
        print("\n" + "\n".join(shape_markdown(res)).rstrip())
    print(f"\nthreads: {threads_line}; versions: {versions}; load average {load_before} -> {load_after}")

    if args.write:
        note = load_note(load_before)
        extra = {"torch": versions.get("torch"), "torch_threads": threads.get("torch"),
                 "transformers": versions.get("transformers")}
        pool = []
        try:
            w, prov = start("provenance", MODULE, {"kind": "provenance", "load_before": load_before,
                                                   "load_after": load_after, "extra": extra, "note": note},
                            args.timeout, pool)
            rev, rec = prov["git"], prov["machine"]
            any_res = next(iter(results.values()))
            hf_row = next(r for r in any_res["rows"] if r["kind"] == "hf")
            ours_host = any_res["rows"][0].get("host") or []
            out = {"command": cmd, "date": date, "git": rev, "machine": rec, "method": METHOD, "threads": threads,
                   "versions": versions, "steps": args.steps, "warmup": args.warmup, "shapes": results}
            md = [
                "# Train-step throughput on CPU: deepseek_jax vs transformers DeepseekV3ForCausalLM",
                "",
                f"Generated by `{cmd}` (git {rev}) on {date}.",
                "",
                f"- method: {METHOD}: one worker process per contender (`python -m benchmarks.bench_train "
                f"--worker=...`; the parent imports neither jax nor torch), each built, compiled and warmed up "
                f"({args.warmup} untimed steps) alone; then {args.steps} rounds, in each the parent asks every "
                f"contender in turn for one step while the others block on their stdin; median step time; the ratio "
                f"is the median of per-round ratios against the fastest transformers row; 'best / best' = fastest "
                f"transformers step / the row's fastest step",
                f"- ours: `make_train_step(cfg, default_train_config())` jit(donate_argnums=0) on `preset('small', "
                f"**shape)` (its scan_unroll), no BOS/EOS, no YaRN, moe_dispatch={args.dispatch} (auto = bucket_tiles "
                f"on CPU), AdamW + clip 1.0 + balance loss alpha 1e-4 + bias update; host settings "
                f"(deepseek_jax.compat.use_cpu_settings, as experiments.run): {', '.join(ours_host) or 'none'}",
                f"- transformers {versions.get('transformers')}: torch {versions.get('torch')} eager, "
                f"attn_implementation={hf_row['attn_implementation']}, experts implementation {args.experts}, "
                f"AdamW(betas (0.9, 0.95), wd 0.1), clip_grad_norm_ 1.0; same fields, untied head, no MTP",
                f"- threads: {threads_line}",
                *prov["machine_lines"],
                "- FLOPs/token = 6 * N_act + 6 * L * T * H * (d_qk + d_v) (N_act = count_params activated: output "
                "head in, input embedding out, k of E routed experts; attention over the full T x T scores). MTP "
                "row: + the MTP module's activated params and head, one more attention layer.",
                "",
            ]
            for res in results.values():
                md += shape_markdown(res)
            w.ask("write", args.timeout, stem=os.path.join(RESULTS, "bench_train_cpu"), data=out, md="\n".join(md))
        except WorkerError as e:
            sys.exit(f"bench_train: {e}")
        finally:
            for w in pool:
                w.close()
    return results


if __name__ == "__main__":
    rc = main()
    if isinstance(rc, int):
        sys.exit(rc)
