"""The driver: kill -9 and SIGTERM mid-run then resume == uninterrupted (bitwise), refused output directory,
non-finite stop. Subprocesses run `python -m experiments.run` exactly as a user would."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deepseek_jax.checkpoint import Checkpointer, abstract_like
from deepseek_jax.data import get_tokenizer
from deepseek_jax.train import loop as loop_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG_FILE = os.path.join(HERE, "loop_config.py")

sys.path.insert(0, HERE)
import loop_config  # noqa: E402


def _cfg(out_dir, **loop_changes):
    c = loop_config.get_config()
    c.loop.out_dir = str(out_dir)
    for k, v in loop_changes.items():
        setattr(c.loop, k, v)
    return c




def _restore(out_dir, step, like):
    ck = Checkpointer(os.path.join(str(out_dir), "checkpoints"))
    state, data, meta = ck.restore(step, abstract_like(like))
    return state, data


def _launch(out_dir, delay):
    cmd = [sys.executable, "-m", "experiments.run", f"--config={CONFIG_FILE}", f"--config.loop.out_dir={out_dir}",
           f"--config.loop.step_delay_s={delay}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(out_dir, proc, min_step, timeout=240):
    path = os.path.join(str(out_dir), "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        steps = [int(s) for s in os.listdir(path) if s.isdigit()] if os.path.isdir(path) else []
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary = loop_lib.run(_cfg(out))
    assert summary["step"] == 10 and summary["stopped_by"] is None
    return out, summary


def test_kill_and_sigterm_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    ref_dir, ref_summary = uninterrupted
    out = tmp_path / "interrupted"
    # 1) SIGTERM mid-run: the step in flight finishes, a checkpoint is written, exit code 0.
    p = _launch(out, delay=1.0)
    _wait_for_checkpoint(out, p, 2)
    time.sleep(1.3)  # land between checkpoints
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0, log
    assert "SIGTERM: checkpoint written at step" in log, log
    # 2) resume, then SIGKILL at an arbitrary later point (no chance to save).
    p = _launch(out, delay=0.7)
    first = _wait_for_checkpoint(out, p, 4)
    time.sleep(0.9)
    p.kill()
    p.wait(timeout=60)
    assert first < 10
    # 3) rerun to completion (same command; in-process here) and compare every bit of the final state.
    summary = loop_lib.run(_cfg(out))
    assert summary["step"] == 10
    like = loop_lib.init_train_state(loop_lib.model_config(_cfg(out), get_tokenizer("byte")), _cfg(out).train,
                                     jax.random.PRNGKey(0), seq_len=32)
    a, da = _restore(ref_dir, 10, like)
    b, db = _restore(out, 10, like)
    assert da == db
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the metrics log has each step exactly once despite the rewinds
    steps = [r["step"] for r in loop_lib.read_jsonl(os.path.join(str(out), "metrics.jsonl"))]
    assert steps == list(range(1, 11))


def test_batch_ramp_sizes_follow_the_paper_rule(uninterrupted):
    # loop_config ramps 2 -> 4 sequences (micro-batch 2) over 256 tokens of seq_len 32: tokens seen before steps
    # 1..5 are 0, 64, 128, 192, 256 -> 2 + 2 * min(1, t/256) rounded down to a multiple of 2 = 2, 2, 2, 2, 4.
    ref_dir, _ = uninterrupted
    sizes = [r["batch_size"] for r in loop_lib.read_jsonl(os.path.join(str(ref_dir), "metrics.jsonl"))]
    assert sizes == [2, 2, 2, 2] + [4] * 6


def test_batch_ramp_bad_fields_are_named(tmp_path):
    c = _cfg(tmp_path / "bad")
    c.data.batch_ramp.start = 3
    with pytest.raises(loop_lib.RunError, match=r"data.batch_ramp.start=3 .* multiple of the micro-batch"):
        loop_lib.run(c)
    assert not os.path.exists(str(tmp_path / "bad"))  # nothing written


def test_refuses_output_dir_of_another_config(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    c = _cfg(ref_dir)
    c.data.seq_len = 16
    with pytest.raises(loop_lib.RunError, match=r"different config \(data.seq_len: 32 -> 16\)"):
        loop_lib.run(c)
    assert os.path.isdir(os.path.join(str(ref_dir), "checkpoints"))  # untouched


def test_nonfinite_stop_writes_nothing(tmp_path, monkeypatch):
    real = loop_lib.make_train_step

    def poisoned(mcfg, tc):
        step = real(mcfg, tc)

        def f(state, batch):
            new, m = step(state, batch)
            bad = (state.step == 2)
            m = dict(m, nonfinite=jax.numpy.where(bad, 1.0, m["nonfinite"]))
            return jax.tree_util.tree_map(lambda n, o: jax.numpy.where(bad, o, n), new, state), m
        return f

    monkeypatch.setattr(loop_lib, "make_train_step", poisoned)
    c = _cfg(tmp_path / "nan")
    c.train.nonfinite = "stop"
    with pytest.raises(loop_lib.RunError, match="step 3: non-finite loss or gradient"):
        loop_lib.run(c)
    assert Checkpointer(os.path.join(str(tmp_path / "nan"), "checkpoints")).steps() == [2]


def test_compute_dtype_auto_is_bf16_off_cpu_and_explicit_wins():
    assert loop_lib.compute_dtype("auto", backend="cpu") == "float32"
    assert loop_lib.compute_dtype("auto", backend="gpu") == "bfloat16"
    assert loop_lib.compute_dtype("auto", backend="tpu") == "bfloat16"
    assert loop_lib.compute_dtype("bfloat16", backend="cpu") == "bfloat16"
    c = loop_config.get_config()
    tok = get_tokenizer("byte")
    assert loop_lib.model_config(c, tok).dtype == "float32"  # tests run on CPU
    c.model.overrides = {"rope_scaling": None, "dtype": "bfloat16"}
    assert loop_lib.model_config(c, tok).dtype == "bfloat16"


def test_dense_model_runs_end_to_end(tmp_path):
    """A model without MoE layers (the scaling experiment's dense MHA models) trains, validates and plots: no
    expert-load metrics exist to log or draw (this path once crashed in plot_run)."""
    c = _cfg(tmp_path / "dense")
    c.model.overrides = {"rope_scaling": None, "first_k_dense_replace": 2, "num_hidden_layers": 2,
                         "attention": "mha", "q_lora_rank": None, "num_nextn_predict_layers": 0}
    c.train.total_steps = 2
    c.loop.eval_every = 2
    summary = loop_lib.run(c)
    assert summary["step"] == 2 and np.isfinite(summary["validation"]["loss"])
    assert "max_vio_global" not in summary["validation"]
    assert summary["plots"] and all(os.path.getsize(p) > 0 for p in summary["plots"])
