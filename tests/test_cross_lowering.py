"""The cross-lowering matrix: every program a GPU or TPU user runs, lowered for cuda and tpu on this CPU host
(``jax.jit(f).trace(ShapeDtypeStructs).lower(lowering_platforms=(p,))``: nothing allocated, no device needed), in
bf16 compute. Each case asserts what the lowered module must hold (the grouped-GEMM kernel's custom call, cuDNN's
fused attention, the expert-parallel all-to-all) and that no dot_general runs an expert-sized batch (no expert GEMM
went dense).

The covering subset (the full product, 2 platforms x 5 dispatches x 4 attention cores x 9 programs, would take
far longer than the 3-minute budget; every value of every axis appears at least once per platform). "Loss
gradient" is the forward and backward pass of the training loss (main CE + MTP CE) over all parameters, the
compute of a train step without the optimizer and metrics around it:
  loss gradient  x every dispatch (dense, ragged, sorted_tiles, grouped) with attention xla
  loss gradient  x the other attention cores (chunked, cudnn [cuda only: it is cuDNN]) with dispatch grouped
  ("auto" is resolved by the host that traces: on this CPU it IS sorted_tiles / xla, already in the matrix; what
  it picks on a GPU / TPU is tested in tests/ops/test_grouped_gemm.py and tests/layers/test_attention_impl.py)
  loss gradient  with FP8 (``fp8.backend="xla"``, the only FP8 backend in this matrix)
  train step, forward, eval step, decode, speculative decode   dispatch grouped, attention cudnn (cuda) / xla (tpu)
  sharded train step on abstract meshes   data 2 x expert 4; fsdp 2 x expert 2 x tensor 2; data 2 x expert 4 with
                                          EP capacity factor 1.25; dispatch grouped, attention xla (jax 0.10.2
                                          lowers no cuDNN attention on an AbstractMesh: it needs devices)
  one V3-width MoE block (d 7168, 128 heads of 192/128, kv_lora 512, q_lora 1536, 256 experts of 2048, top-8),
                forward + gradient, dispatch grouped, attention cudnn (cuda) / xla (tpu)
The model is the tiny preset cut to one MoE layer plus its MTP module (an MoE block too).
"""

from __future__ import annotations

import contextlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from deepseek_jax import compat, config, generate, sharding
from deepseek_jax import model as model_lib
from deepseek_jax.config import Fp8Config
from deepseek_jax.parallel import step as sharded
from deepseek_jax.train import losses
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import TrainState, default_train_config, make_eval_step, make_train_step

PLATFORMS = ("cuda", "tpu")
GROUPED_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
E = 12  # experts (tiny has 8; 12 is a width no other batch dimension of these programs has)
B, T = 4, 16


def _cfg(platform, dispatch="grouped", impl=None, **kw):
    impl = impl or ("cudnn" if platform == "cuda" else "xla")
    return config.preset("tiny", num_hidden_layers=1, first_k_dense_replace=0, dtype="bfloat16", moe_tile_size=32,
                         n_routed_experts=E, moe_dispatch=dispatch, attention_impl=impl, **kw)


@pytest.fixture(autouse=True)
def _cudnn_on_cpu_host(monkeypatch):
    """jax checks the cuDNN version and the GPU's compute capability while tracing the cuDNN attention call; on
    this CPU host both are stubbed, inside these tests only (cuDNN 9.10, a Hopper GPU)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


def _lower(fn, args, platform, kwargs=None, jitted=None, mesh_has_target=False) -> str:
    """The lowered module's text. cuda: the Triton lowering's target GPU comes from the abstract mesh in context
    (compat.gpu_lowering_target), or from the step's own abstract mesh (``mesh_has_target``)."""
    use_target = platform == "cuda" and not mesh_has_target
    ctx = compat.gpu_lowering_target() if use_target else contextlib.nullcontext()
    with ctx:
        j = jitted if jitted is not None else jax.jit(fn)
        return j.trace(*args, **(kwargs or {})).lower(lowering_platforms=(platform,)).as_text()


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*?batching_dims = \[([\d, ]*)\] x \[[\d, ]*\][^\n]*?: \(tensor<([^>]*)>")


def _dot_batch_sizes(text):
    out = []
    for dims, lhs in _DOT.findall(text):
        shape = [int(s) for s in lhs.split("x")[:-1]]
        out.append(tuple(shape[int(i)] for i in dims.split(",") if i.strip()))
    return out


def _check(text, platform, cfg, n_experts=(E,), dense_ok=False):
    dispatch = cfg.moe_dispatch
    if dispatch == "grouped":
        assert GROUPED_CALL[platform] in text
    if not dense_ok:
        batches = _dot_batch_sizes(text)
        assert not any(n in b for b in batches for n in n_experts), f"an expert-batched dot_general: {batches}"
    impl = cfg.attention_impl
    if impl == "cudnn":
        assert CUDNN_FWD in text
    else:
        assert "__cudnn$" not in text


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _variables(cfg):
    return nn.meta.unbox(jax.eval_shape(
        lambda: model_lib.Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))))


def _state(cfg, tc):
    v = _variables(cfg)
    opt = jax.eval_shape(make_optimizer(tc.optim).init, v["params"])
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    return TrainState(step=i32, params=v["params"], opt_state=opt, router=v["router"], skipped=i32)


def _batch(n_micro=1, b=B):
    return {"tokens": jax.ShapeDtypeStruct((n_micro, b, T + 1), jnp.int32)}


def _train_text(cfg, platform):
    tc = default_train_config(total_steps=10)
    return _lower(make_train_step(cfg, tc), (_state(cfg, tc), _batch()), platform)


def _loss_grad_text(cfg, platform):
    """d(main CE + MTP CE)/d(params), bf16 compute: the forward and backward pass of training."""
    net = model_lib.Transformer(cfg)

    def loss(params, router, tok):
        out = net.apply({"params": params, "router": router}, tok[:, :-1])
        ce = losses.cross_entropy(out.logits, tok[:, 1:], jnp.ones(tok[:, 1:].shape, jnp.float32))[0]
        for k, lk in enumerate(out.mtp_logits, start=1):
            ce = ce + losses.cross_entropy(lk, *losses.mtp_targets(tok, jnp.ones(tok[:, 1:].shape), k))[0]
        return ce

    v = _variables(cfg)
    return _lower(jax.grad(loss), (v["params"], v["router"], jax.ShapeDtypeStruct((B, T + 1), jnp.int32)), platform)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dispatch", ["dense", "ragged", "sorted_tiles", "grouped"])
def test_loss_grad_each_dispatch(platform, dispatch):
    cfg = _cfg(platform, dispatch, impl="xla")
    text = _loss_grad_text(cfg, platform)
    _check(text, platform, cfg, dense_ok=dispatch == "dense")
    if dispatch == "dense":  # the dense reference does batch over the experts: the check above can fail
        assert any(E in b for b in _dot_batch_sizes(text))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", ["chunked", "cudnn"])  # xla: test_loss_grad_each_dispatch
def test_loss_grad_each_attention_impl(platform, impl):
    if impl == "cudnn" and platform != "cuda":
        pytest.skip("cuDNN attention is a cuda lowering")
    cfg = _cfg(platform, "grouped", impl=impl, attn_chunk=4 if impl == "chunked" else 0)
    text = _loss_grad_text(cfg, platform)
    _check(text, platform, cfg)
    if impl == "cudnn":
        assert CUDNN_BWD in text
        assert f"tensor<{B}x{cfg.num_attention_heads}x{T}x{T}xf32>" not in text  # no materialised scores


@pytest.mark.parametrize("platform", PLATFORMS)
def test_loss_grad_fp8_xla(platform):
    cfg = _cfg(platform, "grouped", fp8=Fp8Config(backend="xla"))
    text = _loss_grad_text(cfg, platform)
    assert "f8E4M3FN" in text
    # FP8 routes the experts through dispatch_fp8_tiles (vmapped tiles of the static bound), not the grouped GEMM
    assert all(E not in b for b in _dot_batch_sizes(text))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step(platform):
    cfg = _cfg(platform)
    text = _train_text(cfg, platform)
    _check(text, platform, cfg)
    if cfg.attention_impl == "cudnn":
        assert CUDNN_BWD in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_eval_decode_speculative(platform):
    cfg = _cfg(platform)
    v = _variables(cfg)
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    fwd = _lower(lambda v, t: model_lib.Transformer(cfg).apply(v, t).logits, (v, tok), platform)
    _check(fwd, platform, cfg)
    ev = _lower(make_eval_step(cfg), (v["params"], v["router"], _batch()), platform)
    _check(ev, platform, cfg)
    i32 = jnp.int32
    S = jax.ShapeDtypeStruct
    dec = _lower(None, (v, S((B, T), i32), S((B,), i32), S((B,), i32), S((), i32), jax.random.PRNGKey(0)), platform,
                 kwargs=dict(cfg=cfg, cache_len=2 * T, max_new_tokens=4, sampling=generate.Sampling(),
                             return_logits=False), jitted=generate._decode)
    # decode: prefill through a cache (the einsum core), absorbed steps: no cuDNN call, grouped experts
    assert GROUPED_CALL[platform] in dec and "__cudnn$" not in dec
    assert all(E not in b for b in _dot_batch_sizes(dec))
    spec = _lower(None, (v, S((1, T), i32), S((), i32), S((), i32), S((), i32)), platform,
                  kwargs=dict(cfg=cfg, cache_len=2 * T, max_new_tokens=4), jitted=generate._speculative)
    assert GROUPED_CALL[platform] in spec and "__cudnn$" not in spec
    assert all(E not in b for b in _dot_batch_sizes(spec))


MESHES = [("data=2,expert=4", None), ("fsdp=2,expert=2,tensor=2", None), ("data=2,expert=4", 1.25)]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("mesh_spec,cf", MESHES, ids=["data2xexpert4", "fsdp2xexpert2xtensor2", "ep_cf1.25"])
def test_sharded_train_step(platform, mesh_spec, cf):
    # attention xla: jax's cuDNN attention is a custom_partitioning primitive, which jax 0.10.2 does not lower on an
    # AbstractMesh ("primitives that require devices"); the unsharded programs above cover it.
    cfg = _cfg(platform, impl="xla")
    tc = default_train_config(total_steps=10)
    shape = sharding.mesh_shape(mesh_spec)
    kw = {"abstract_device": compat.abstract_gpu_device()} if platform == "cuda" else {}
    if kw and kw["abstract_device"] is None:
        kw = {}
    am = compat.abstract_mesh(tuple(shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES, **kw)
    sizes = sharding.axis_sizes(am)
    specs = sharded.state_specs(cfg, tc, sizes)
    shard = sharding.to_shardings(specs, am)
    state = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                   _state(cfg, tc), shard)
    n_b = sharding.batch_axes_size(sizes)
    tokens = jax.ShapeDtypeStruct((1, 2 * n_b, T + 1), jnp.int32, sharding=NamedSharding(am, sharding.batch_spec(3)))
    step = sharded.shard_train_step(cfg, tc, am, donate=False, ep_capacity_factor=cf)
    text = _lower(None, (state, {"tokens": tokens}), platform, jitted=step.jitted, mesh_has_target=True)
    n_ep = sizes["expert"]
    _check(text, platform, cfg, n_experts=(E, E // n_ep))  # global and per-device expert counts
    assert "all_to_all" in text
    n_local = 2 * T  # two sequences per device
    cap = n_local * cfg.num_experts_per_tok if cf is None else math.ceil(cf * n_local * cfg.num_experts_per_tok / n_ep)
    assert f"tensor<{n_ep}x{cap}x{cfg.hidden_size}xbf16>" in text  # the all-to-all buffer [P_ep, C, d]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_v3_width_moe_block(platform):
    """One MoE block at DeepSeek-V3's widths, forward and gradient: the grouped kernel and (cuda) cuDNN attention
    with q/k head 192 and v head 128 padded to 192; no dot_general batched over the 256 experts."""
    cfg = config.preset("deepseek-v3-671b", dtype="bfloat16", param_dtype="bfloat16", moe_dispatch="grouped",
                        attention_impl="cudnn" if platform == "cuda" else "xla", num_hidden_layers=4)
    blk = model_lib.Block(cfg, moe=True)
    b, t = 1, 32
    x = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)
    v = _abstract(nn.meta.unbox(jax.eval_shape(lambda: blk.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                                                  jnp.zeros(pos.shape, jnp.int32)))))
    f = lambda v, x, p: blk.apply(v, x, p)[0].astype(jnp.float32).sum()
    g = jax.grad(lambda p, r, x, pos: f({"params": p, "router": r}, x, pos))
    text = _lower(g, (v["params"], v["router"], x, pos), platform)
    _check(text, platform, cfg, n_experts=(cfg.n_routed_experts,))
    if platform == "cuda":
        assert CUDNN_BWD in text
        assert "tensor<1x32x128x192xbf16>" in text  # q [B, T, H, 192] into cuDNN; v padded 128 -> 192
