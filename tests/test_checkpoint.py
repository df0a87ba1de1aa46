import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.checkpoint import Checkpointer, CheckpointError, CheckpointLayoutError, abstract_like
from testing_utils import change_one_stored_value


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


def test_corrupt_latest_falls_back_with_one_line(tmp_path, capsys):
    ck = Checkpointer(str(tmp_path / "ck"), keep=3)
    ck.save(1, _state(1), {"i": 1}, {})
    ck.save(2, _state(2), {"i": 2}, {})
    # Damage every file of the newest step's state.
    for root, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    ck2 = Checkpointer(str(tmp_path / "ck"), keep=3)
    step, state, data, _ = ck2.restore_latest(abstract_like(_state(0)))
    assert step == 1 and data == {"i": 1}
    _equal(state, _state(1))
    err = capsys.readouterr().err
    assert "checkpoint step 2 could not be restored" in err and len(err.strip().splitlines()) == 1, err


def test_nothing_restorable_raises_and_empty_is_none(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"))
    assert ck.restore_latest(abstract_like(_state(0))) is None
    ck.save(5, _state(5), {}, {})
    shutil.rmtree(tmp_path / "ck" / "5" / "state")
    with pytest.raises(CheckpointError, match="could be restored"):
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


def test_changed_values_are_detected_moved_aside_and_the_step_can_be_saved_again(tmp_path, capsys):
    """orbax alone restores a changed array value without error (one element rewritten through TensorStore, every
    file well-formed); the content checksums catch it, the step is kept under <step>.corrupt, and saving that step
    again works (the crash loop: fall back, retrain, StepAlreadyExistsError)."""
    big = lambda s: {"w": jnp.arange(4000.0).reshape(40, 100) * s, "step": jnp.array(s, jnp.int32)}
    ck = Checkpointer(str(tmp_path / "ck"), keep=3, log_path=str(tmp_path / "run.log"))
    ck.save(1, big(1), {"i": 1}, {})
    ck.save(2, big(2), {"i": 2}, {})
    assert change_one_stored_value(str(tmp_path / "ck" / "2"), "w") == "w"
    ck2 = Checkpointer(str(tmp_path / "ck"), keep=3, log_path=str(tmp_path / "run.log"))
    step, state, data, _ = ck2.restore_latest(abstract_like(big(0)))
    assert step == 1 and data == {"i": 1}
    _equal(state, big(1))
    err = capsys.readouterr().err
    assert "content checksum mismatch in state leaf w" in err and len(err.strip().splitlines()) == 1, err
    assert os.path.isdir(tmp_path / "ck" / "2.corrupt") and ck2.steps() == [1]
    assert "Traceback" in open(tmp_path / "run.log").read()  # the details go to the log file
    ck2.save(2, big(2), {"i": 2}, {})  # no StepAlreadyExistsError
    assert Checkpointer(str(tmp_path / "ck")).restore_latest(abstract_like(big(0)))[0] == 2


def test_checksums_do_not_change_what_is_restored_and_meta_is_clean(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=1)
    ck.save(3, _state(3), {"i": 3}, {"config": "x"})
    state, data, meta = ck.restore(3, abstract_like(_state(0)))
    _equal(state, _state(3))
    assert meta == {"config": "x"}


@pytest.mark.parametrize("keep", [0, -1, None, 1.5, True])
def test_keep_must_be_a_positive_int(tmp_path, keep):
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        Checkpointer(str(tmp_path / "ck"), keep=keep)
    assert not os.path.exists(tmp_path / "ck")
