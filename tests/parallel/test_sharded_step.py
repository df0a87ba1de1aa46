"""Sharded train steps on 8 virtual CPU devices equal the single-device step.

tests/conftest.py starts XLA with --xla_force_host_platform_device_count=8. One fp32 train step of a small
V3-topology model (a dense layer, a MoE layer with 8 experts, an MTP module) from the same state and batch, on one
device (the reference: plain ``jax.jit(make_train_step)``, no mesh) and on three meshes:

  data 8                       pure data parallelism
  data 2 x expert 4            expert parallelism: shard_map + all-to-all, 2 experts per device
  fsdp 2 x expert 2 x tensor 2 ZeRO-3 + expert + tensor parallelism

must give the same loss and metrics, and the same updated parameters, Adam moments and router bias. Comparison:
per tensor, ||sharded - single|| / ||single|| <= 1e-5 (reductions are reordered across devices, so bitwise
equality is not expected; elementwise relative error is meaningless for entries near zero). The step starts at
state.step = 1 so the learning rate is the peak (1e-2); Adam's eps is 1e-3 (see ``_train_cfg`` for why).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.parallel import step as sharded
from deepseek_jax.train.step import default_train_config, init_train_state, make_train_step

from parallel_common import CFG, SEQ, make_tokens, make_variables

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")

RTOL = 1e-5


def _train_cfg():
    tc = default_train_config(total_steps=100, peak_lr=1e-2, warmup_steps=1)
    tc.balance.gamma = 0.01
    # Adam's first step maps a gradient entry g to g / (|g| + eps). With the default eps = 1e-8 an entry that is
    # ~3e-9 only because large terms cancel (so it carries reordering noise of a few %, on one device or many)
    # moves its parameter by a few % of lr: measured 7e-5 relative on a whole tensor from ONE such entry. With
    # eps = 1e-3 the map is smooth, so the parameters inherit the gradients' ~1e-7 agreement; the moments
    # (compared below) do not depend on eps at all.
    tc.optim.eps = 1e-3
    return tc


def _state(cfg, tc):
    state = init_train_state(cfg, tc, None, variables=make_variables(cfg))
    return state.replace(step=jnp.ones([], jnp.int32))


@pytest.fixture(scope="module")
def reference():
    tc = _train_cfg()
    tokens = make_tokens(CFG, n_micro=2, b=8)
    state0 = _state(CFG, tc)
    new, metrics = jax.jit(make_train_step(CFG, tc))(state0, {"tokens": tokens})
    return jax.device_get(state0), jax.device_get(new), jax.device_get(metrics), tokens


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (nb if nb > 0 else 1.0)


def _compare_trees(name, got, want, rtol=RTOL):
    gl = jax.tree_util.tree_flatten_with_path(got)[0]
    wl = jax.tree_util.tree_leaves(want)
    assert len(gl) == len(wl), name
    bad = []
    for (path, g), w in zip(gl, wl):
        r = _rel(g, w)
        if not r <= rtol:
            bad.append(f"{name}{jax.tree_util.keystr(path)}: rel {r:.2e}")
    assert not bad, "\n".join(bad)


MESHES = [
    ({"data": 8}, "dense"),
    ({"data": 2, "expert": 4}, "bucket_tiles"),  # the CPU default dispatch, inside the shard_map
    ({"fsdp": 2, "expert": 2, "tensor": 2}, "dense"),
]


@pytest.mark.parametrize("spec,dispatch", MESHES, ids=["data8", "data2xexpert4", "fsdp2xexpert2xtensor2"])
def test_sharded_step_equals_single_device(reference, spec, dispatch):
    state0, want, want_m, tokens = reference
    cfg = CFG.replace(moe_dispatch=dispatch)
    tc = _train_cfg()
    mesh = sharding.make_mesh(spec)
    state = sharded.shard_state(_state(cfg, tc), cfg, tc, mesh)
    step = sharded.shard_train_step(cfg, tc, mesh)
    new, m = step(state, {"tokens": tokens})

    # the state really is laid out by the rules
    specs = sharded.state_specs(cfg, tc, sharding.axis_sizes(mesh))
    got_specs = jax.tree_util.tree_map(lambda x: x.sharding.spec, new.params)
    assert jax.tree_util.tree_leaves(got_specs, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree_util.tree_leaves(specs.params, is_leaf=lambda x: isinstance(x, P))
    experts = new.params["moe_layers"]["mlp"]["experts_gate"]
    n_shards = spec.get("expert", 1) * spec.get("fsdp", 1) * spec.get("tensor", 1)
    assert experts.addressable_shards[0].data.size * n_shards == experts.size

    new, m = jax.device_get((new, m))
    assert abs(float(m["loss"]) - float(want_m["loss"])) <= RTOL * abs(float(want_m["loss"]))
    for k in ("ce", "mtp_loss", "balance_loss", "grad_norm", "expert_load", "max_vio_layers", "mtp_expert_load"):
        assert _rel(m[k], want_m[k]) <= RTOL, k
    if spec.get("expert", 1) > 1:
        assert float(m["ep_dropped"]) == 0.0  # the expert-parallel path ran, and dropped nothing
    else:
        assert "ep_dropped" not in m
    _compare_trees("params", new.params, want.params)
    _compare_trees("opt_state", new.opt_state, want.opt_state)
    # the bias moves by exactly +-gamma from integer loads: identical routing gives an identical bias
    _compare_trees("router", new.router, want.router, rtol=0.0)
    # and the step changed the parameters by far more than the tolerance (the comparison above is not vacuous)
    for get in (lambda p: p["moe_layers"]["mlp"]["experts_gate"], lambda p: p["moe_layers"]["mlp"]["router"]["kernel"]):
        assert _rel(get(want.params), get(state0.params)) > 100 * RTOL
    assert int(new.step) == 2


def test_batch_not_divisible_raises():
    tc = _train_cfg()
    mesh = sharding.make_mesh({"data": 8})
    step = sharded.shard_train_step(CFG, tc, mesh)
    state = jax.eval_shape(lambda: _state(CFG, tc))
    with pytest.raises(ValueError, match="not divisible by the mesh's batch axes"):
        step.jitted.lower(state, {"tokens": jax.ShapeDtypeStruct((1, 4, SEQ + 1), jnp.int32)})


def test_init_sharded_state_lays_out_by_the_rules():
    tc = _train_cfg()
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
    state = sharded.init_sharded_state(CFG, tc, mesh, jax.random.PRNGKey(0), seq_len=SEQ)
    specs = sharded.state_specs(CFG, tc, sharding.axis_sizes(mesh))
    got = jax.tree_util.tree_map(lambda x: x.sharding.spec, (state.params, state.router))
    want = (specs.params, specs.router)
    is_p = lambda x: isinstance(x, P)
    assert jax.tree_util.tree_leaves(got, is_leaf=is_p) == jax.tree_util.tree_leaves(want, is_leaf=is_p)
    gate = state.params["moe_layers"]["mlp"]["experts_gate"]  # [1, 8, 64, 32]: experts over 4, d over 2
    assert gate.sharding.spec == P(None, "expert", "fsdp")
    assert gate.addressable_shards[0].data.shape == (1, 2, 32, 32)
    assert float(jnp.abs(gate).max()) > 0  # initialised, not zeros


def test_fp8_under_expert_parallelism(reference):
    """ModelConfig.fp8 with an expert mesh axis: the routed experts' GEMMs go through FP8 on the device holding
    the expert. The forward quantizes per row and per expert block, so the loss equals the single-device FP8 loss
    (up to reordering), and differs from the fp32 loss by the FP8 error (so FP8 really ran under the shard_map)."""
    _, _, want_m, tokens = reference
    cfg = CFG.replace(moe_dispatch="sorted_tiles", fp8=True)
    tc = _train_cfg()
    _, single_m = jax.jit(make_train_step(cfg, tc))(_state(cfg, tc), {"tokens": tokens})
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    step = sharded.shard_train_step(cfg, tc, mesh)
    _, m = step(sharded.shard_state(_state(cfg, tc), cfg, tc, mesh), {"tokens": tokens})
    m, single_m = jax.device_get((m, single_m))
    assert float(m["ep_dropped"]) == 0.0
    # at initialisation the loss is ~ln(V) whatever the weights, so FP8 moves it by only ~1e-5 relative: compare
    # the sharded-vs-single difference with the FP8-vs-fp32 difference, not with a fixed tolerance
    d_shard = abs(float(m["ce"]) - float(single_m["ce"]))
    d_fp8 = abs(float(single_m["ce"]) - float(want_m["ce"]))
    g_shard, g_fp8 = _rel(m["grad_norm"], single_m["grad_norm"]), _rel(single_m["grad_norm"], want_m["grad_norm"])
    msg = f"ce: sharded-single {d_shard:.2e}, fp8-fp32 {d_fp8:.2e}; grad_norm: {g_shard:.2e}, {g_fp8:.2e}"
    assert d_shard <= 0.05 * d_fp8, msg
    # gradients: the Wgrad's 128x1 token tiles group the rows a device received, so they are close, not equal
    # (measured 1.5e-4 relative on the gradient norm, the size of FP8's own effect on it, 1.1e-4)
    assert g_shard < 1e-3, msg
