"""The shared base of every ablation experiment, and the machinery that turns an arm diff into a run config.

An experiment file (balancing.py, mtp.py, ...) defines

    EXPERIMENT = "balancing"
    ARMS = {"aux_free": {"train.balance.alpha": 0.0}, ...}     # dotted-key diffs over ``base_config()``
    SEEDS = (0, 1, 2)
    CLAIMS = [...]                                               # what experiments/sweep.py checks, see below
    def get_config(arg="aux_free"): return base.experiment_config(EXPERIMENT, ARMS, arg, ...)

and is run by hand (one arm, one seed) with

    python -m experiments.run --config=experiments/configs/balancing.py:aux_free --config.loop.seed=1

or by ``python -m experiments.sweep balancing`` (every arm x seed, resumable, then the tables).

The base model ("cpu-base") is the V3 topology shrunk until one run fits in about 7 minutes on one CPU core:
MLA with q compression, 1 dense + 2 MoE layers, 1 shared + 16 routed experts (top-4 in 4 groups, 2 kept),
sigmoid router, byte tokens, sequence 128, batch 16 (2,048 tokens/step), 1,500 steps (3.07M tokens). MTP is off
in the base (mtp.py turns it on). Deviations from the paper's recipe, all forced by runs that are ~10^6 times
shorter: peak LR PEAK_LR = 1e-3 (chosen by the pilot) with 100 warmup steps (paper 2.2e-4 / 2000), the paper's
LR phases otherwise mapped onto the run's steps, bias speed GAMMA (paper 0.001; chosen by the pilot in pilot.py),
FIM off (it would only add noise to a validation loss this short). docs/experiments.md says why each number is
what it is.

Claims (CLAIMS in each experiment file) are dicts read by experiments/sweep.py:
  id, claim         a short name and the sentence the paper makes
  paper             the paper's number(s), with the source
  metric            a key of the final validation record (loss, bpb, max_vio_global) or of the run's
                    derived values (kv_bytes_per_token, params_total, ...)
  a, b              the two arms compared (mean_a - mean_b)
  expect            "less" (paper: a < b), "equal" (paper: no difference), "rel_within" (|a - b| <= tol |b|),
                    "power_law" (scaling)
  tol               the tolerance of "equal" (default 1%) / "rel_within", relative to |mean_b|
  paper_rel         optional: the paper's effect as a relative difference (a - b) / b, for the power analysis
                    (experiments/power.py); absent where the paper's numbers are not transcribed
  noise             optional: the pilot contrast standing for the claim's noise ("same_init" / "different_init";
                    default: by whether the arms' parameter counts agree)
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

import ml_collections

from deepseek_jax import model as model_lib
from deepseek_jax.data import get_tokenizer
from deepseek_jax.train.run_config import BatchPlan, model_config, parallel_fields
from deepseek_jax.train.step import default_train_config

SEEDS = (0, 1, 2)

# The CPU base model: preset "small" with these fields replaced (vocab/eos come from the byte tokenizer).
BASE_MODEL = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=352,
                  moe_intermediate_size=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                  n_group=4, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=0,
                  max_position_embeddings=1024)


# The CPU recipe (docs/experiments.md "Design"): 1,500 steps of 16 x 128 byte tokens (3.07M tokens, 10x the
# first design's 300 x 8 x 128), a 100-step warmup (a 20-step warmup at this peak LR split the seeds of the first
# design), validation on a fixed 64-batch (131,072-token) slice of the held-out documents every 250 steps.
TOTAL_STEPS = 1500
BATCH_SIZE = 16
WARMUP_STEPS = 100
# The bias update speed of the CPU runs, chosen by the pilot sweep experiments/configs/pilot.py (held-out seed
# 100; docs/experiments.md "Bias-speed pilot"); the paper's schedule shape is kept: constant, 0 for the last 3.4%.
GAMMA = 0.003
# The peak learning rate, chosen by the pilot's step 3 (experiments/configs/pilot.py; RESULTS.md "Pilot: peak
# learning rate"): the first recipe's 2e-3 (PILOT_LR) gave a paired SD of the same-init contrast's final loss of
# 0.071 on seeds 100-102, 1e-3 gave 0.024 and a lower mean loss, so the rule fixed before those runs moved the base
# to 1e-3.
PILOT_LR = 2e-3
PEAK_LR = 1e-3


def base_config(total_steps: int = TOTAL_STEPS, peak_lr: float = PEAK_LR, warmup_steps: int = WARMUP_STEPS,
                seq_len: int = 128, batch_size: int = BATCH_SIZE) -> ml_collections.ConfigDict:
    """The full run config every arm starts from (the fields of experiments/configs/quickstart.py)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "small", "overrides": dict(BASE_MODEL)})
    # corpus "default": the pinned built-in snapshot v1 (deepseek_jax/data/corpus.py), the same on every interpreter
    c.data = ml_collections.ConfigDict(dict(corpus="default", tokenizer="byte", seq_len=seq_len,
                                            batch_size=batch_size, fim_rate=0.0, val_fraction=0.05, seed=0))
    c.train = default_train_config(total_steps=total_steps, peak_lr=peak_lr, warmup_steps=warmup_steps)
    c.train.balance.gamma = GAMMA
    c.train.balance.scope = "sequence"
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/unnamed", seed=0, grad_accum=1, log_every=25,
                                            eval_every=250, eval_batches=64, ckpt_every=500, keep=1,
                                            overwrite=False, progress=True, sample_prompt="", sample_tokens=0,
                                            max_skipped_fraction=0.05, **parallel_fields()))
    return c


# Paper scale (``<arm>,scale=paper``): V3 §4.5's small ablation baseline, the 15.7B MoE (preset
# "ablation-small-moe-15.7b": V2-Lite's shape, see BUILD.md), on 1.33T tokens with V3's pre-training recipe (§4.2:
# seq 4K, batch 3072 -> 15360 over 469B tokens, LR 2.2e-4 with its phases mapped onto the run, gamma 0.001,
# alpha 1e-4, FIM 0.1, BF16 Adam moments). The recipe of the ablation runs themselves is not published beyond
# this; the corpus and tokenizer are the user's (the paper's data and 128K BPE are not public): both fields are
# left empty and the run refuses to start until they are set, e.g.
#   python -m experiments.run --distributed --config=experiments/configs/balancing.py:aux_free,scale=paper \
#       --config.data.corpus='/data/shards/*.jsonl:text' --config.data.tokenizer=/data/tokenizer.json \
#       --config.loop.mesh=fsdp=16,expert=8
PAPER_PRESET = "ablation-small-moe-15.7b"
PAPER_TOKENS = 1.33e12
PAPER_GRAD_ACCUM = 40  # micro-batch 15360 / 40 = 384 sequences; the ramp's start 3072 is 8 of them


def steps_for_tokens(data_cfg, grad_accum: int, tokens: float) -> int:
    """Steps until ``tokens`` training tokens are seen, with the loop's own batch plan (ramp included)."""
    plan, seen, step = BatchPlan(data_cfg, grad_accum), 0.0, 0
    while seen < tokens:
        seen += plan.size(step) * plan.seq_len
        step += 1
    return step


def paper_base_config() -> ml_collections.ConfigDict:
    """The run config of every arm at paper scale (the comment above)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": PAPER_PRESET, "overrides": {}, "compute_dtype": "auto"})
    c.data = ml_collections.ConfigDict(dict(corpus="", tokenizer="", seq_len=4096, batch_size=15360,
                                            fim_rate=0.1, val_fraction=0.001, seed=0))
    c.data.batch_ramp = ml_collections.ConfigDict(dict(start=3072, tokens=469e9))
    c.train = default_train_config(total_steps=steps_for_tokens(c.data, PAPER_GRAD_ACCUM, PAPER_TOKENS))
    c.train.optim.bf16_moments = True
    c.train.balance.scope = "sequence"
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/unnamed", seed=0, grad_accum=PAPER_GRAD_ACCUM,
                                            log_every=10, eval_every=1000, eval_batches=64, ckpt_every=500,
                                            keep=3, overwrite=False, progress=True, sample_prompt="",
                                            sample_tokens=0, max_skipped_fraction=0.05, **parallel_fields()))
    return c


def set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """cfg["a.b.c"] = value for a dotted key; the path must exist (a typo in an arm raises, naming it), except
    under ``model.overrides`` where any ModelConfig field may be added (ModelConfig validates it at run time)."""
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise ValueError(f"arm key {key!r}: no field {'.'.join(parts[:i + 1])!r} in the base config")
        node = node[p]
    last = parts[-1]
    if last not in node and key.split(".")[:2] != ["model", "overrides"]:
        raise ValueError(f"arm key {key!r}: no field {key!r} in the base config")
    node[last] = value


def parse_arg(arg: Optional[str], arms: Mapping[str, Any]):
    """'<arm>[,seed=<n>][,scale=cpu|paper]' -> (arm, seed or None, scale); raises naming the known arms."""
    parts = [p.strip() for p in (arg or "").split(",")]
    arg, seed, scale = parts[0], None, "cpu"
    for rest in parts[1:]:
        k, _, v = rest.partition("=")
        k, v = k.strip(), v.strip()
        if k == "seed" and v.lstrip("-").isdigit():
            seed = int(v)
        elif k == "scale" and v in ("cpu", "paper"):
            scale = v
        else:
            raise ValueError(f"config argument {rest!r}: expected 'seed=<int>' or 'scale=cpu|paper'")
    if arg not in arms:
        raise ValueError(f"unknown arm {arg!r}; this experiment's arms: {sorted(arms)}")
    return arg, seed, scale


def experiment_config(experiment: str, arms: Mapping[str, Mapping[str, Any]], arg: Optional[str],
                      base: Optional[ml_collections.ConfigDict] = None,
                      paper_arms: Optional[Mapping[str, Mapping[str, Any]]] = None) -> ml_collections.ConfigDict:
    """Base config + the arm's diff; ``loop.seed`` and ``data.seed`` = the seed (default 0); out_dir
    runs/sweeps/<experiment>/<arm>/seed<seed> (experiments/sweep.py copies the small logs into
    experiments/results/<experiment>/runs/). With ``scale=paper`` in ``arg``: ``paper_base_config()`` + the
    arm's diff from ``paper_arms`` (an experiment without them has no paper-scale version), out_dir
    runs/paper/<experiment>/<arm>/seed<seed>."""
    arm, seed, scale = parse_arg(arg, dict(arms, **(paper_arms or {})))
    if scale == "paper":
        if not paper_arms or arm not in paper_arms:
            raise ValueError(f"experiment {experiment!r} has no paper-scale arm {arm!r}"
                             + (f"; its paper-scale arms: {sorted(paper_arms)}" if paper_arms else
                                " (its arms are shaped for the CPU base model)"))
        cfg, arms = paper_base_config(), paper_arms
    else:
        if arm not in arms:
            raise ValueError(f"unknown arm {arm!r}; this experiment's arms: {sorted(arms)}")
        cfg = copy.deepcopy(base) if base is not None else base_config()
    diff = dict(arms[arm])
    steps = diff.pop("train.total_steps", None)
    if steps is not None:  # the schedule's step-valued fields follow total_steps
        keep = {k: cfg.train.balance[k] for k in ("gamma", "alpha", "bias_update", "scope")}
        cfg.train = default_train_config(total_steps=int(steps), peak_lr=cfg.train.optim.peak_lr,
                                         warmup_steps=cfg.train.optim.warmup_steps)
        for k, v in keep.items():
            cfg.train.balance[k] = v
    for k, v in diff.items():
        set_dotted(cfg, k, v)
    seed = 0 if seed is None else seed
    cfg.loop.seed = seed
    cfg.data.seed = seed
    cfg.loop.out_dir = f"runs/{'paper' if scale == 'paper' else 'sweeps'}/{experiment}/{arm}/seed{seed}"
    return cfg


def arm_model_config(cfg: ml_collections.ConfigDict):
    """The ModelConfig an arm trains (byte tokenizer's vocab/eos, as the loop builds it), for derived values."""
    return model_config(cfg, get_tokenizer(cfg.data.tokenizer))


def derived_values(cfg: ml_collections.ConfigDict) -> Dict[str, float]:
    """Numbers an arm has by construction (no training): parameter counts and KV-cache bytes per token."""
    mcfg = arm_model_config(cfg)
    c = model_lib.count_params(mcfg)
    return {"params_total": c["total"], "params_activated": c["activated"], "params_mtp": c["mtp"],
            "kv_bytes_per_token": mcfg.kv_cache_bytes_per_token("bfloat16")}
