import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.checkpoint import Checkpointer, CheckpointError, CheckpointLayoutError, abstract_like


def _state(seed):
    k = jax.random.PRNGKey(seed)
    return {"params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.arange(3.0)},
            "step": jnp.array(seed, jnp.int32), "moments": jnp.ones((2,), jnp.bfloat16) * seed}


def _equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bitwise_and_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(s), {"epoch": s, "pos": [s, 2 * s]}, {"config": "x", "step": s})
    assert ck.steps() == [2, 3]
    step, state, data, meta = ck.restore_latest(abstract_like(_state(0)))
    assert step == 3 and data == {"epoch": 3, "pos": [3, 6]} and meta["step"] == 3
    _equal(state, _state(3))


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=3)
    ck.save(1, _state(1), {"i": 1}, {})
    ck.save(2, _state(2), {"i": 2}, {})
    # Damage every file of the newest step's state.
    for root, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    ck2 = Checkpointer(str(tmp_path / "ck"), keep=3)
    with pytest.warns(UserWarning, match="could not be restored"):
        step, state, data, _ = ck2.restore_latest(abstract_like(_state(0)))
    assert step == 1 and data == {"i": 1}
    _equal(state, _state(1))


def test_nothing_restorable_raises_and_empty_is_none(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"))
    assert ck.restore_latest(abstract_like(_state(0))) is None
    ck.save(5, _state(5), {}, {})
    shutil.rmtree(tmp_path / "ck" / "5" / "state")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="could be restored"):
        Checkpointer(str(tmp_path / "ck")).restore_latest(abstract_like(_state(0)))


def test_old_router_layout_is_refused_naming_the_renamed_path(tmp_path):
    """A state saved before the Router module (params .../mlp/router_kernel, router .../mlp/bias) is refused with
    an error naming the new path, and no older step is tried (they share the layout)."""
    def state(new_layout):
        k = jnp.ones((2, 4, 3))
        mlp_p = {"router": {"kernel": k}} if new_layout else {"router_kernel": k}
        mlp_r = {"router": {"bias": jnp.zeros((2, 3))}} if new_layout else {"bias": jnp.zeros((2, 3))}
        return {"params": {"moe_layers": {"mlp": mlp_p}}, "router": {"moe_layers": {"mlp": mlp_r}},
                "step": jnp.array(0, jnp.int32)}
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, state(False), {}, {})
    ck.save(2, state(False), {}, {})
    with pytest.raises(CheckpointLayoutError, match="params/moe_layers/mlp/router_kernel is now "
                                                    "params/moe_layers/mlp/router/kernel"):
        Checkpointer(str(tmp_path / "ck")).restore_latest(abstract_like(state(True)))
    # the new layout round-trips
    ck2 = Checkpointer(str(tmp_path / "ck2"))
    ck2.save(1, state(True), {}, {})
    _equal(ck2.restore_latest(abstract_like(state(True)))[1], state(True))
