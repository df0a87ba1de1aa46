import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.checkpoint import Checkpointer, CheckpointError, abstract_like


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
