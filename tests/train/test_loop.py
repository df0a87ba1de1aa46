"""The driver: kill -9 and SIGTERM mid-run then resume == uninterrupted (bitwise), refused output directory,
non-finite stop. Subprocesses run `python -m experiments.run` exactly as a user would."""

import json
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
from deepseek_jax.metrics import read_jsonl
from deepseek_jax.train import loop as loop_lib
from deepseek_jax.train import run_config
from testing_utils import change_one_stored_value

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


def _assert_same_final_state(ref_dir, out):
    """The step-10 checkpoints of the two runs hold bitwise-equal states and data-iterator states."""
    like = loop_lib.init_train_state(run_config.model_config(_cfg(out), get_tokenizer("byte")), _cfg(out).train,
                                     jax.random.PRNGKey(0), seq_len=32)
    a, da = _restore(ref_dir, 10, like)
    b, db = _restore(out, 10, like)
    assert da == db
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
    _assert_same_final_state(ref_dir, out)
    # the metrics log has each step exactly once despite the rewinds
    steps = [r["step"] for r in read_jsonl(os.path.join(str(out), "metrics.jsonl"))]
    assert steps == list(range(1, 11))


def test_batch_ramp_sizes_follow_the_paper_rule(uninterrupted):
    # loop_config ramps 2 -> 4 sequences (micro-batch 2) over 256 tokens of seq_len 32: tokens seen before steps
    # 1..5 are 0, 64, 128, 192, 256 -> 2 + 2 * min(1, t/256) rounded down to a multiple of 2 = 2, 2, 2, 2, 4.
    ref_dir, _ = uninterrupted
    sizes = [r["batch_size"] for r in read_jsonl(os.path.join(str(ref_dir), "metrics.jsonl"))]
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
    assert run_config.compute_dtype("auto", backend="cpu") == "float32"
    assert run_config.compute_dtype("auto", backend="gpu") == "bfloat16"
    assert run_config.compute_dtype("auto", backend="tpu") == "bfloat16"
    assert run_config.compute_dtype("bfloat16", backend="cpu") == "bfloat16"
    c = loop_config.get_config()
    tok = get_tokenizer("byte")
    assert run_config.model_config(c, tok).dtype == "float32"  # tests run on CPU
    c.model.overrides = {"rope_scaling": None, "dtype": "bfloat16"}
    assert run_config.model_config(c, tok).dtype == "bfloat16"


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


# ---------------------------------------------------------------------------------------------------------------
# Reliability: corrupt checkpoints, no silent deletion, config errors before anything is written
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_newest_checkpoint_of_a_moved_run_resumes_from_the_previous_one(uninterrupted, tmp_path, capfd):
    """The run directory is moved to a new path (loop.out_dir is not compared) and one parameter value of its newest
    checkpoint is changed behind orbax's back (the files stay readable): the content checksum catches it, the step
    is moved aside, the run retrains from step 8 to the same bits, saves step 10 again (this used to be a
    StepAlreadyExistsError crash loop), and a second rerun succeeds too."""
    import shutil
    ref_dir, _ = uninterrupted
    out = tmp_path / "moved"
    shutil.copytree(str(ref_dir), str(out))
    leaf = change_one_stored_value(str(out / "checkpoints" / "10"), "params.embed.embedding")
    summary = loop_lib.run(_cfg(out))
    assert summary["step"] == 10
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "could not be restored" in ln]
    assert len(lines) == 1 and "step 10 could not be restored (CheckpointError: " in lines[0], err  # ours
    assert "content checksum mismatch" in lines[0], err
    where = os.path.abspath(os.path.join(str(out), "checkpoints", "10"))  # full text: stderr cuts at 200 chars
    with open(os.path.join(str(out), "run.log")) as f:
        assert f"CheckpointError: {where}: content checksum mismatch in state leaf {leaf}\n" in f.read()
    assert os.path.isdir(out / "checkpoints" / "10.corrupt")
    _assert_same_final_state(ref_dir, out)
    steps = [r["step"] for r in read_jsonl(os.path.join(str(out), "metrics.jsonl"))]
    assert steps == list(range(1, 11))
    assert loop_lib.run(_cfg(out))["step"] == 10  # the rerun of the rerun


@pytest.mark.parametrize("field,value,match", [
    ("loop.keep", 0, r"loop.keep must be an int >= 1, got 0"),
    ("loop.ckpt_every", 0, r"loop.ckpt_every must be an int >= 1, got 0"),
    ("loop.log_every", 0, r"loop.log_every must be an int >= 1, got 0"),
    ("train.balance.gamma", float("inf"), r"train config balance.gamma: must be a finite number, got inf"),
    ("data.val_fraction", 1.0, r"data.val_fraction must be a number in \[0.0, 1.0\)"),
    ("model.overrides", {"num_hidden_layers": "2"}, r"ModelConfig.num_hidden_layers: must be a positive int, got .2."),
    ("model.overrides", {"hidden_sise": 64}, r"unknown field\(s\) \['hidden_sise'\]"),
])
def test_config_errors_name_the_field_and_write_nothing(tmp_path, field, value, match):
    c = _cfg(tmp_path / "bad")
    head, last = field.rsplit(".", 1)
    node = c
    for p in head.split("."):
        node = node[p]
    node[last] = value
    with pytest.raises(loop_lib.RunError, match=match):
        loop_lib.run(c)
    assert not os.path.exists(str(tmp_path / "bad"))  # so the corrected rerun is not "a different config"


def _fake_run_dir(path, cfg, extra=()):
    os.makedirs(os.path.join(path, "checkpoints", "4"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(run_config.comparable_config(cfg), f)
    for name in extra:
        with open(os.path.join(path, name), "w") as f:
            f.write("mine")


def test_overwrite_moves_aside_and_refuses_foreign_files(tmp_path):
    other = _cfg(tmp_path / "run")
    other.data.seq_len = 16
    _fake_run_dir(str(tmp_path / "run"), other, extra=("notes.txt",))
    c = _cfg(tmp_path / "run", overwrite=True)
    with pytest.raises(loop_lib.RunError, match=r"also holds \['notes.txt'\].*refusing"):
        loop_lib._prepare_out_dir(c)
    assert os.path.exists(tmp_path / "run" / "notes.txt") and os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
    os.remove(tmp_path / "run" / "notes.txt")
    loop_lib._prepare_out_dir(c)  # only run outputs: moved aside, never deleted
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(moved) == 1 and os.path.isdir(tmp_path / moved[0] / "checkpoints" / "4")
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f) == run_config.comparable_config(c)
    # without overwrite the refusal no longer recommends deleting anything
    c2 = _cfg(tmp_path / "run")
    c2.data.seq_len = 8
    with pytest.raises(loop_lib.RunError, match="move the old run aside"):
        loop_lib._prepare_out_dir(c2)


def test_checkpoints_without_config_json_are_refused_not_rewritten(tmp_path):
    _fake_run_dir(str(tmp_path / "run"), _cfg(tmp_path / "run"))
    os.remove(tmp_path / "run" / "config.json")
    c = _cfg(tmp_path / "run")
    c.train.optim.peak_lr = 3e-3
    with pytest.raises(loop_lib.RunError, match="holds checkpoints/ but no config.json"):
        loop_lib.run(c)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_truncate_jsonl_drops_a_torn_final_line_only(tmp_path):
    p = str(tmp_path / "m.jsonl")
    with open(p, "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    loop_lib.truncate_jsonl(p, 5)
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    with open(p, "w") as f:
        f.write('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        loop_lib.truncate_jsonl(p, 5)


def test_skipped_steps_over_the_limit_fail_loudly_and_step0_validation_is_not_duplicated(tmp_path, capfd):
    """lr 1e30: every update overflows (its norm is inf), so every step is skipped and the run learns nothing;
    it used to finish with exit 0. It keeps its checkpoint and summary but raises (experiments.run exits 3).
    The directory also holds what a run killed before its first checkpoint leaves: config.json and a step-0
    validation record, which is not duplicated (the sweep used to drop such a seed from its means)."""
    out = tmp_path / "lr"
    c = _cfg(out)
    c.train.total_steps, c.loop.eval_every, c.loop.ckpt_every = 4, 4, 4
    c.train.optim.update(dict(peak_lr=1e30, warmup_steps=0, constant_steps=4))
    os.makedirs(str(out))
    with open(out / "config.json", "w") as f:
        json.dump(run_config.comparable_config(c), f)
    with open(out / "validation.jsonl", "w") as f:
        f.write('{"step": 0, "loss": 5.5}\n')
    with pytest.raises(loop_lib.TooManySkippedError, match=r"4 of 4 steps were skipped") as e:
        loop_lib.run(c)
    assert e.value.summary["skipped_fraction_exceeded"] and "WARNING" in capfd.readouterr().err
    with open(out / "summary.json") as f:
        assert json.load(f)["skipped_steps"] == 4
    assert [r["step"] for r in read_jsonl(str(out / "validation.jsonl"))] == [0, 4]


def _cli(out_dir, *extra, timeout=180):
    cmd = [sys.executable, "-m", "experiments.run", f"--config={CONFIG_FILE}", f"--config.loop.out_dir={out_dir}",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra,message", [
    (("--config.loop.ckpt_every=0",), "error: loop.ckpt_every must be an int >= 1, got 0"),
    (("--config.model.overrides.num_hidden_layers=0",),
     "error: model (model.preset='tiny' + model.overrides): ModelConfig.num_hidden_layers: must be a positive int, "
     "got 0"),
    (("--config.train.bogus=1",), "error: --config.train.bogus: the config has no field 'train.bogus'"),
])
def test_cli_config_errors_are_one_line_exit_2(tmp_path, extra, message):
    """--config.model.overrides.<field> reaches ModelConfig even though loop_config's overrides lack the key."""
    r = _cli(tmp_path / "cli", *extra)
    assert r.returncode == 2 and r.stderr.strip() == message, (r.returncode, r.stderr[-3000:])
    assert not os.path.exists(tmp_path / "cli")
