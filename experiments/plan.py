"""Paper scale on paper: lower the REAL train step of a preset on an abstract mesh of N devices, without
allocating anything, and report what each device would hold and move.

    python -m experiments.plan --config=deepseek-v3-671b --mesh=fsdp=32,expert=64 --write

What is computed, and how (every number below is produced by this script):
  lowering     ``jax.jit(step).trace(abstract state, abstract batch).lower(lowering_platforms=("cuda",))`` with
               every input a ShapeDtypeStruct carrying a NamedSharding on a ``jax.sharding.AbstractMesh``: the
               same ``make_train_step`` and ``sharding`` rules a run uses, with the expert-parallel shard_map
               and its all-to-alls. Nothing is allocated and no device is needed. The all-to-all ops and their
               per-device buffer shapes are read from the lowered StableHLO.
  parameters   per device: sum over variables of prod(NamedSharding.shard_shape) x itemsize (fp32 master weights
               and the fp32 router bias), from the rules; optimizer state the same over the Adam moments
               (``state_specs``); gradients: the fp32 accumulator of the micro-batch scan plus one micro-batch's
               gradient, both sharded like the parameters (2 x the fp32 parameter bytes).
  activations  the residuals the backward pass keeps for ONE micro-batch on one device, under the remat policy
               (``jax.ad_checkpoint`` saved_residuals of the step's loss on the local batch shape [b, T], the
               single-device path with ``moe_dispatch=ragged``, i.e. n*K routed rows, the balanced EP count),
               parameters excluded (a saved bf16 copy of a weight is counted at its per-device shard size, as
               the sharded step holds it); plus the transient working set of one block's backward (its residuals with no
               remat), plus the expert-parallel all-to-all buffers of one MoE layer (send + receive, dispatch
               and combine).
  FLOPs/token  model FLOPs, the convention of benchmarks/bench_train.py: 6 * N_act + 6 * L * T * H * (d_qk + d_v)
               (full T x T scores, PaLM), with N_act = count_params(...)["activated"]; with the MTP module
               (V3 trains with it) its activated parameters (attention, shared + K routed experts, eh_proj, the
               shared output head again) and one more attention layer are added.
  all-to-all   bytes each device sends per step: for each MoE layer (main + MTP) and micro-batch, dispatch and
               combine in the forward pass, their transposes in the backward pass, and again in the forward
               recompute under remat; rows in the compute dtype, a token's K rows counted once each. Given for
               the balanced routed volume (n*K rows per device per direction, what a ragged all-to-all moves) and
               for this project's static buffers (P_ep x C rows, C = n*K dropless or ceil(c*n*K/P_ep)).
  MFU          implied by the paper's 180K H800 GPU-hours per trillion tokens (V3 §1, Table 1): tokens/s/GPU =
               1e12 / (180e3 * 3600), times FLOPs/token, over the H800's dense peak (989.5 TFLOP/s BF16,
               1979 TFLOP/s FP8; H800 = H100 SXM compute).

Deviation from the paper's layout (V3 §3.1: 16-way pipeline (DualPipe), 64-way EP over 8 nodes, ZeRO-1 DP): SPMD
JAX has no pipeline schedule here (BUILD.md, "DualPipe"), so the 2048 devices are fsdp 32 x expert 64 with ZeRO-3
sharding of everything (parameters, moments, gradients) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import sys
import time
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import config as config_lib
from deepseek_jax import model as model_lib
from deepseek_jax.provenance import git_rev, machine, utc_now, write_result_files
from deepseek_jax.ops import expert_parallel
from deepseek_jax import sharding
from deepseek_jax.parallel import step as sharded
from deepseek_jax.train import losses
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import TrainState, default_train_config, make_train_step

GIB = 2.0 ** 30
PAPER_GPU_HOURS_PER_T_TOKENS = 180e3  # V3 Table 1 / §1: 180K H800 GPU hours per trillion tokens
H800_PEAK = {"bf16": 989.5e12, "fp8": 1979e12}  # dense tensor-core FLOP/s (H100 SXM compute)
PAPER_GLOBAL_BATCH = 15360  # sequences (V3 §4.2, after the ramp)
PAPER_SEQ = 4096


def _bytes_sharded(tree, specs, mesh) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves)
    total = 0
    for x, s in zip(leaves, spec_leaves):
        shard = NamedSharding(mesh, s).shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _residuals(f, *args, top: int = 4, weight_shards=None):
    """(total bytes, the ``top`` largest as "GiB dtype[shape] source") of the residuals the backward pass of f
    keeps, f's arguments (the parameters) excluded. f runs the single-device model on one device's batch, so a
    residual that is a copy of a weight (the bf16 cast of a kernel; recognised by having a parameter's shape,
    ``weight_shards``: shape -> number of shards) is global there but sharded in the real step: it is counted
    at its per-device size."""
    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent returns the list
    items = []
    weight_shards = weight_shards or {}
    for aval, why in saved_residuals(f, *args):
        if "argument" in why:
            continue
        nbytes = math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
        if tuple(aval.shape) in weight_shards:
            nbytes //= weight_shards[tuple(aval.shape)]
            why = f"(weight copy, per-device shard) {why}"
        src = re.sub(r"from .*?/deepseek_jax/", "deepseek_jax/", why)
        items.append((nbytes, f"{nbytes / GIB:.2f} GiB {aval.str_short()} {src}"))
    items.sort(key=lambda t: -t[0])
    return sum(n for n, _ in items), [d for _, d in items[:top]]


def flops_per_token(cfg, seq_len: int = PAPER_SEQ) -> Dict[str, float]:
    counts = model_lib.count_params(cfg)
    L, T, H = cfg.num_hidden_layers, seq_len, cfg.num_attention_heads
    attn = 6 * T * H * (cfg.qk_head_dim + cfg.v_head_dim)
    main = 6 * counts["activated"] + L * attn
    D = cfg.num_nextn_predict_layers
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    mtp_active = (counts["mtp"] - D * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
                  + D * cfg.vocab_size * cfg.hidden_size)
    return {"main": float(main), "with_mtp": float(main + 6 * mtp_active + D * attn),
            "activated_params": counts["activated"], "mtp_activated_params": int(mtp_active),
            "total_params": counts["total"], "mtp_params": counts["mtp"]}


@contextlib.contextmanager
def _cudnn_traceable():
    """jax's cuDNN attention checks the installed cuDNN version and the GPU's compute capability while it traces.
    A plan is traced on a host without a GPU, for a Hopper GPU with cuDNN >= 9.10 (what MLA's 192-wide heads
    need): on such a host, and only for the plan's trace, the two checks answer that. On a GPU host nothing is
    changed."""
    if jax.default_backend() == "gpu":
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as fa  # the checks live here; no public switch exists
    saved = fa.check_cudnn_version, fa.check_compute_capability
    fa.check_cudnn_version, fa.check_compute_capability = (lambda: 91000), (lambda capability: True)
    try:
        yield
    finally:
        fa.check_cudnn_version, fa.check_compute_capability = saved


def cudnn_backward_workspace(cfg, micro_batch: int, seq_len: int) -> int:
    """Bytes cuDNN's fused-attention backward allocates besides its inputs and outputs, for one attention call (by
    formula, not lowered: the custom call's workspace is not in the module): the fp32 dQ accumulator
    [b, T, H, d_qk] and two fp32 per-row softmax statistics [b, H, T] (the forward's log-sum-exp, which jax also
    keeps as a residual, and the backward's rowsum(dO * O)). Sequence padded to even (layers/attention.py)."""
    t = seq_len + seq_len % 2
    H = cfg.num_attention_heads
    return micro_batch * t * H * cfg.qk_head_dim * 4 + 2 * micro_batch * H * t * 4


def plan(preset: str, mesh_spec: str, seq_len: int, micro_batch: int, global_batch: int, remat: str,
         ep_capacity_factor=None, attn_chunk: int = 0, attention_impl: str = "xla") -> Dict[str, Any]:
    if attention_impl not in ("xla", "cudnn"):
        raise ValueError(f"plan: attention_impl must be 'xla' (einsums, optionally chunked) or 'cudnn', got "
                         f"{attention_impl!r}")
    impl = "chunked" if attn_chunk and attention_impl == "xla" else attention_impl
    cfg = config_lib.preset(preset, dtype="bfloat16", param_dtype="float32", moe_dispatch="ragged",
                            remat_policy=remat, attn_chunk=attn_chunk, attention_impl=impl)
    with _cudnn_traceable() if impl == "cudnn" else contextlib.nullcontext():
        return _plan(cfg, preset, mesh_spec, seq_len, micro_batch, global_batch, remat, ep_capacity_factor,
                     attn_chunk)


def _plan(cfg, preset, mesh_spec, seq_len, micro_batch, global_batch, remat, ep_capacity_factor, attn_chunk):
    tc = default_train_config(total_steps=100_000)
    am = sharding.abstract_mesh(mesh_spec)
    sizes = sharding.axis_sizes(am)
    n_dev = math.prod(sizes.values())
    n_b = sharding.batch_axes_size(sizes)
    t0 = time.perf_counter()

    specs = sharded.state_specs(cfg, tc, sizes)
    shapes = nn.meta.unbox(sharded.abstract_boxed_variables(cfg))
    opt_shapes = jax.eval_shape(make_optimizer(tc.optim).init, shapes["params"])
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=i32, params=shapes["params"], opt_state=opt_shapes, router=shapes["router"], skipped=i32)
    shard = sharding.to_shardings(specs, am)
    state_in = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, shard)
    tokens = jax.ShapeDtypeStruct((1, micro_batch * n_b, seq_len + 1), jnp.int32,
                                  sharding=NamedSharding(am, sharding.batch_spec(3)))
    # jax's cuDNN attention is a custom_partitioning primitive, which cannot lower on an AbstractMesh (it needs
    # devices): the sharded step is lowered with the einsum core (the all-to-all shapes do not depend on it);
    # the memory of the attention core comes from the residual traces below, which use cfg as given.
    step_cfg = cfg.replace(attention_impl="xla") if cfg.attention_impl == "cudnn" else cfg
    step = make_train_step(step_cfg, tc, expert_parallel.dispatch_for(step_cfg, am, ep_capacity_factor))

    def traced(s, b):
        with sharding.use_mesh(am):
            return step(s, b)

    lowered = jax.jit(traced, out_shardings=(shard, NamedSharding(am, P()))).trace(
        state_in, {"tokens": tokens}).lower(lowering_platforms=("cuda",))
    t_lower = time.perf_counter() - t0
    text = lowered.as_text()
    a2a_shapes = sorted(set(re.findall(r"all_to_all\"\(.*?\) <\{.*?\}> : \((tensor<[^>]*>)\)", text)))

    # ---- per-device state bytes ----
    p_bytes = _bytes_sharded(state.params, specs.params, am)
    r_bytes = _bytes_sharded(state.router, specs.router, am)
    o_bytes = _bytes_sharded(state.opt_state, specs.opt_state, am)
    g_bytes = 2 * _bytes_sharded(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                                        state.params), specs.params, am)

    # ---- activations: residuals of one micro-batch's loss on one device ----
    net = model_lib.Transformer(cfg)
    local_tok = jax.ShapeDtypeStruct((micro_batch, seq_len + 1), jnp.int32)

    def loss(params, router, tok):
        out = net.apply({"params": params, "router": router}, tok[:, :-1])
        ce, _ = losses.cross_entropy(out.logits, tok[:, 1:], jnp.ones(tok[:, 1:].shape, jnp.float32))
        for k, lk in enumerate(out.mtp_logits, start=1):
            ce = ce + losses.cross_entropy(lk, *losses.mtp_targets(tok, jnp.ones(tok[:, 1:].shape), k))[0]
        return ce

    weight_shards = {}
    for x, sp in zip(jax.tree_util.tree_leaves(state.params),
                     jax.tree_util.tree_leaves(specs.params, is_leaf=lambda t: isinstance(t, P))):
        n = math.prod(x.shape) // math.prod(NamedSharding(am, sp).shard_shape(x.shape))
        weight_shards[tuple(x.shape)] = n
        nl = math.prod(x.shape[1:]) // math.prod(NamedSharding(am, sp).shard_shape(x.shape)[1:])
        weight_shards.setdefault(tuple(x.shape[1:]), nl)  # one layer of a scanned stack
    act_bytes, act_top = _residuals(loss, state.params, state.router, local_tok, weight_shards=weight_shards)
    # one block's backward working set: its residuals with no remat (dense block, MoE block: take the max)
    cfg_nr = cfg.replace(remat_policy="none")
    x = jax.ShapeDtypeStruct((micro_batch, seq_len, cfg.hidden_size), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((micro_batch, seq_len), jnp.int32)
    block_ws, block_top = 0, []
    for moe in (False, True):
        blk = model_lib.Block(cfg_nr, moe=moe)
        bvars = nn.meta.unbox(jax.eval_shape(lambda: blk.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                                              jnp.zeros(pos.shape, jnp.int32))))
        f = lambda v, xx, pp: blk.apply(v, xx, pp)[0].astype(jnp.float32).sum()
        ws, top = _residuals(f, bvars, x, pos, weight_shards=weight_shards)
        if ws > block_ws:
            block_ws, block_top = ws, top

    # ---- expert-parallel all-to-all ----
    n_ep = sizes["expert"]
    K, d = cfg.num_experts_per_tok, cfg.hidden_size
    n_local = micro_batch * seq_len
    cap = expert_parallel.capacity(n_local, K, n_ep, ep_capacity_factor)
    itemsize = 2  # bf16 rows
    moe_layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers
    passes = 2 + 2 + (2 if remat != "none" else 0)  # fwd dispatch+combine, bwd transposes, remat recompute
    seqs_per_device = global_batch / n_b
    micro_per_step = seqs_per_device / micro_batch
    routed_row_bytes = n_local * K * d * itemsize
    buffer_bytes = n_ep * cap * d * itemsize
    a2a_routed = moe_layers * micro_per_step * passes * routed_row_bytes * (n_ep - 1) / n_ep
    a2a_buffer = moe_layers * micro_per_step * passes * buffer_bytes * (n_ep - 1) / n_ep
    ep_layer_buffers = 2 * 2 * buffer_bytes  # send + receive, dispatch + combine, one layer

    fl = flops_per_token(cfg, seq_len)
    tok_s_gpu = 1e12 / (PAPER_GPU_HOURS_PER_T_TOKENS * 3600)
    step_s = global_batch * seq_len / (tok_s_gpu * n_dev)  # at the paper's throughput on this many devices
    mfu = {f"{k}_{p}": tok_s_gpu * fl[k] / v for k in ("main", "with_mtp") for p, v in H800_PEAK.items()}

    # With attn_chunk, one chunk's scores are recomputed inside the block's backward and are not residuals:
    # [micro, H, chunk, T] as fp32 masked scores + fp32 exp + bf16 probs + bool mask (by formula, not lowered).
    chunk_ws = (micro_batch * cfg.num_attention_heads * attn_chunk * seq_len * (4 + 4 + 2 + 1)
                if 0 < attn_chunk < seq_len else 0)
    cudnn_ws = cudnn_backward_workspace(cfg, micro_batch, seq_len) if cfg.attention_impl == "cudnn" else 0
    total = p_bytes + r_bytes + o_bytes + g_bytes + act_bytes + block_ws + chunk_ws + cudnn_ws + ep_layer_buffers
    return {
        "preset": preset, "mesh": sizes, "devices": n_dev, "seq_len": seq_len, "micro_batch_per_device": micro_batch,
        "global_batch_sequences": global_batch, "micro_batches_per_step": micro_per_step, "remat_policy": remat,
        "compute_dtype": "bfloat16", "param_dtype": "float32", "moe_dispatch_local": "ragged",
        "ep_capacity_factor": ep_capacity_factor, "attn_chunk": attn_chunk, "attention_impl": cfg.attention_impl,
        "lower_seconds": round(t_lower, 1),
        "lowered_all_to_all_buffer_types": a2a_shapes,
        "bytes_per_device": {
            "parameters": p_bytes, "router_bias": r_bytes, "optimizer_state": o_bytes, "gradients": g_bytes,
            "activations_saved_per_micro_batch": act_bytes, "one_block_backward_working_set": block_ws,
            "attention_chunk_recompute": chunk_ws, "cudnn_attention_backward_workspace": cudnn_ws,
            "ep_all_to_all_buffers_one_layer": ep_layer_buffers, "total": total},
        "largest_saved_activations": act_top, "largest_block_residuals": block_top,
        "flops_per_token": fl,
        "all_to_all_bytes_per_step_per_device": {
            "routed_rows_balanced": a2a_routed, "static_buffers": a2a_buffer, "capacity_rows_per_peer": cap,
            "moe_layers": moe_layers, "passes_per_micro_batch": passes},
        "paper_implied": {"tokens_per_s_per_gpu": tok_s_gpu, "mfu": mfu, "step_seconds": step_s,
                          "all_to_all_bytes_per_s_per_device": a2a_routed / step_s,
                          "h800_peak_flops": H800_PEAK, "gpu_hours_per_trillion_tokens": PAPER_GPU_HOURS_PER_T_TOKENS},
    }


def _md(r: Dict[str, Any], command: str, machine: Dict[str, Any]) -> str:
    b = r["bytes_per_device"]
    fl = r["flops_per_token"]
    a = r["all_to_all_bytes_per_step_per_device"]
    m = r["paper_implied"]["mfu"]
    g = lambda x: f"{x / GIB:,.2f} GiB"
    lines = [
        f"# Plan: {r['preset']} on {r['devices']} devices ({', '.join(f'{k} {v}' for k, v in r['mesh'].items())})",
        "", f"Command: `{command}`", "",
        f"Machine that lowered it: {machine['cpu']} ({machine['cores']} cores), jax {machine['jax']}, "
        f"{machine['date']}; code {machine['code_version']}. Lowered for cuda on an AbstractMesh in "
        f"{r['lower_seconds']} s, nothing allocated"
        + (" (with the einsum attention core: jax's cuDNN attention cannot lower on an AbstractMesh; the memory rows "
           "below trace the cuDNN core)" if r.get("attention_impl") == "cudnn" else "") + ".", "",
        f"Batch: {r['global_batch_sequences']} sequences x {r['seq_len']} tokens per step, micro-batch "
        f"{r['micro_batch_per_device']} sequence(s) per device, {r['micro_batches_per_step']:g} micro-batches per "
        f"step; remat `{r['remat_policy']}`, bf16 compute, fp32 master weights and Adam moments, local expert "
        f"dispatch `ragged`, EP capacity factor {r['ep_capacity_factor']} (None = dropless static buffer), attention "
        f"query chunk {r['attn_chunk'] or 'none (the whole sequence)'}, attention core "
        f"`{r.get('attention_impl', 'xla')}`.", "",
        "| per device | bytes |", "|---|---|",
        f"| parameters (fp32) | {g(b['parameters'])} |",
        f"| router bias | {b['router_bias']:,} B |",
        f"| optimizer state (Adam mu, nu fp32) | {g(b['optimizer_state'])} |",
        f"| gradients (fp32 accumulator + one micro-batch) | {g(b['gradients'])} |",
        f"| activations saved for backward, one micro-batch, remat `{r['remat_policy']}` | "
        f"{g(b['activations_saved_per_micro_batch'])} |",
        f"| one block's backward working set (no remat inside the block) | {g(b['one_block_backward_working_set'])} |",
        *([f"| one attention chunk's recomputed scores ({r['attn_chunk']} query rows; by formula) | "
           f"{g(b['attention_chunk_recompute'])} |"] if b.get("attention_chunk_recompute") else []),
        *([f"| cuDNN fused-attention backward workspace, one call (fp32 dQ accumulator + 2 softmax row statistics; "
           f"by formula) | {g(b['cudnn_attention_backward_workspace'])} |"]
          if b.get("cudnn_attention_backward_workspace") else []),
        f"| EP all-to-all buffers, one MoE layer (send+recv, dispatch+combine) | "
        f"{g(b['ep_all_to_all_buffers_one_layer'])} |",
        f"| **total** | **{g(b['total'])}** |", "",
        "Largest saved activations: " + "; ".join(f"`{t}`" for t in r["largest_saved_activations"]) + ".", "",
        "Largest residuals of one block's backward: " + "; ".join(f"`{t}`" for t in r["largest_block_residuals"])
        + ".", "",
        f"FLOPs per token (model FLOPs, 6N + attention, full T x T): {fl['main'] / 1e9:,.1f} GFLOP main model, "
        f"{fl['with_mtp'] / 1e9:,.1f} GFLOP with the MTP module (activated params {fl['activated_params'] / 1e9:.2f}B "
        f"+ MTP {fl['mtp_activated_params'] / 1e9:.2f}B).", "",
        f"All-to-all per device per step ({a['moe_layers']} MoE layers x {a['passes_per_micro_batch']} passes x "
        f"{r['micro_batches_per_step']:g} micro-batches, off-device share (P-1)/P): "
        f"{a['routed_rows_balanced'] / GIB:,.1f} GiB of routed rows (balanced, what a ragged all-to-all moves); "
        f"{a['static_buffers'] / GIB:,.1f} GiB with this project's static buffers "
        f"({a['capacity_rows_per_peer']:,} rows per peer).", "",
        "Lowered all-to-all buffer types (per device): "
        + ", ".join("`" + s + "`" for s in r["lowered_all_to_all_buffer_types"]) + ".",
        "",
        f"Paper-implied MFU: 180K H800 GPU-hours per 1T tokens = {r['paper_implied']['tokens_per_s_per_gpu']:,.0f} "
        f"tokens/s/GPU; x FLOPs/token over the dense peak: main model {m['main_bf16']:.1%} of BF16 "
        f"({m['main_fp8']:.1%} of FP8), with MTP {m['with_mtp_bf16']:.1%} of BF16 ({m['with_mtp_fp8']:.1%} of FP8). "
        f"At that rate a step of this batch on {r['devices']} devices takes "
        f"{r['paper_implied']['step_seconds']:.1f} s, "
        f"so the balanced routed all-to-all above needs "
        f"{r['paper_implied']['all_to_all_bytes_per_s_per_device'] / 1e9:,.0f} GB/s per device, overlapped with "
        f"compute (the recompute pass of remat included; V3 §3.2 overlaps it by DualPipe and limits a token to 4 "
        f"nodes).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="deepseek-v3-671b", help=f"a preset: {config_lib.preset_names()}")
    ap.add_argument("--mesh", default="fsdp=32,expert=64", help="e.g. data=2,fsdp=16,expert=64,tensor=1")
    ap.add_argument("--seq_len", type=int, default=PAPER_SEQ)
    ap.add_argument("--micro_batch", type=int, default=1, help="sequences per device per micro-batch")
    ap.add_argument("--global_batch", type=int, default=PAPER_GLOBAL_BATCH, help="sequences per step")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--ep_capacity_factor", type=float, default=None)
    ap.add_argument("--attn_chunk", type=int, default=0, help="ModelConfig.attn_chunk: query rows per attention "
                    "chunk (0: the whole sequence at once)")
    ap.add_argument("--attention_impl", default="xla", choices=["xla", "cudnn"],
                    help="ModelConfig.attention_impl: xla (einsums, [B,H,T,S] scores; chunked with --attn_chunk) or "
                    "cudnn (fused attention: no scores kept)")
    ap.add_argument("--write", action="store_true", help="write experiments/results/plan_<config>_<N>.{json,md}")
    args = ap.parse_args(argv)
    r = plan(args.config, args.mesh, args.seq_len, args.micro_batch, args.global_batch, args.remat,
             args.ep_capacity_factor, args.attn_chunk, args.attention_impl)
    code = git_rev(dirty=False)
    machine_rec = {**machine(), "date": utc_now(), "code_version": code}
    command = "python -m experiments.plan " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    r["command"], r["machine"] = command, machine_rec
    md = _md(r, command, machine_rec)
    print(md)
    if args.write:
        suffix = "" if args.ep_capacity_factor is None else f"_cf{args.ep_capacity_factor:g}"
        suffix += f"_chunk{args.attn_chunk}" if args.attn_chunk else ""
        suffix += "_cudnn" if args.attention_impl == "cudnn" else ""
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"plan_{args.config}_{r['devices']}{suffix}")
        write_result_files(out, r, md)


if __name__ == "__main__":
    main()
