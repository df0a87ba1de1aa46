"""The public FP8-kernel route: ``config.preset("tiny", fp8={"backend": "pallas", "interpret": False})`` gives a
train step that jax.export lowers for cuda (Triton kernels) and for tpu (Mosaic TPU kernels), on one device and,
through ``parallel.step.shard_train_step``, on an abstract data x expert mesh, where every kernel call must sit
inside a shard_map region (Mosaic TPU refuses automatic partitioning, and XLA has no partitioning rule for a
Triton call). Lowering only: nothing is compiled or allocated."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from deepseek_jax import compat, config, sharding
from deepseek_jax.parallel import step as sharded
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import TrainState, default_train_config, make_train_step
from tests.ops.lowering_util import MOSAIC_TPU, TRITON, calls_outside_manual, count_calls, export_text

CFG = config.preset("tiny", fp8={"backend": "pallas", "interpret": False})
SEQ, BATCH = 16, 8
PLATFORMS = [("cuda", TRITON, MOSAIC_TPU), ("tpu", MOSAIC_TPU, TRITON)]


def _abstract_state(tc, shardings=None):
    shapes = nn.meta.unbox(sharded.abstract_boxed_variables(CFG))
    opt = jax.eval_shape(make_optimizer(tc.optim).init, shapes["params"])
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=i32, params=shapes["params"], opt_state=opt, router=shapes["router"], skipped=i32)
    if shardings is None:
        return state
    return jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, shardings)


def _batch(sh=None):
    return {"tokens": jax.ShapeDtypeStruct((1, BATCH, SEQ + 1), jnp.int32, sharding=sh),
            "mask": jax.ShapeDtypeStruct((1, BATCH, SEQ), jnp.float32, sharding=sh)}


@pytest.mark.parametrize("platform,target,other", PLATFORMS, ids=[p[0] for p in PLATFORMS])
def test_fp8_train_step_lowers_on_one_device(platform, target, other):
    tc = default_train_config(total_steps=100)
    text = export_text(make_train_step(CFG, tc), (_abstract_state(tc), _batch()), platform)
    assert count_calls(text, target) > 0 and count_calls(text, other) == 0


@pytest.mark.parametrize("platform,target,other", PLATFORMS, ids=[p[0] for p in PLATFORMS])
def test_fp8_train_step_lowers_on_a_data_x_expert_mesh(platform, target, other):
    tc = default_train_config(total_steps=100)
    kw = dict(abstract_device=compat.abstract_gpu()) if platform == "cuda" else {}
    # Auto axes, as jax 0.10's default: jax 0.11's AbstractMesh defaults to Explicit axes, under which the
    # project's sharded step (FP8 or not) does not trace yet (the embedding gather asks for an out_sharding).
    am = sharding.abstract_mesh({"data": 2, "expert": 4}, **compat.auto_axes(len(sharding.MESH_AXES)), **kw)
    step = sharded.shard_train_step(CFG, tc, am)
    state = _abstract_state(tc, step.state_shardings)
    text = export_text(step.jitted, (state, _batch(NamedSharding(am, sharding.batch_spec(3)))), platform,
                       mesh_context=False)
    n = count_calls(text, target)
    assert n > 0 and count_calls(text, other) == 0
    assert calls_outside_manual(text, target) == 0, f"{n} kernel calls, some outside shard_map"
