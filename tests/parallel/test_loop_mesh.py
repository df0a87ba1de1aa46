"""The training driver on a mesh (``loop.mesh``): the same run as on one device, and a lossless resume.

tests/conftest.py gives the process 8 virtual CPU devices. The run is tests/train/loop_config.py (tiny V3 model
with MTP, batch ramp, gradient accumulation, aux-free bias) cut to 4 steps, on the mesh expert 2 x tensor 2:
expert parallelism (shard_map + all-to-all) and tensor-parallel projections, batch split over 2 devices.

- Every logged training loss equals the single-device run's within 1e-5 (relative; reductions are reordered
  across devices, so not bitwise), the router bias norm too, and the final validation loss.
- Resume on the mesh restores the sharded state from orbax and loses nothing: deleting the final checkpoint
  (step 4) and rerunning the same config resumes from step 2 and ends with parameters, optimizer state and router
  bias bitwise equal to the uninterrupted mesh run's step-4 checkpoint.
- A mesh that does not divide the batch is refused before anything runs, naming the fields.
"""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.metrics import read_jsonl
from deepseek_jax.train import loop as loop_lib
from deepseek_jax.train.step import rederive_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
import loop_config  # noqa: E402
from parallel_common import free_port, run_processes  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/conftest.py sets 8)")

MESH = "expert=2,tensor=2"


def _cfg(out_dir, mesh=""):
    c = loop_config.get_config()
    base = c.train.copy_and_resolve_references()
    c.train.total_steps = 4  # as experiments.run does for --config.train.total_steps: the schedule follows
    rederive_schedule(base, c.train, {"total_steps"})
    c.loop.eval_every = 4
    c.loop.out_dir = str(out_dir)
    c.loop.mesh = mesh
    return c


def _final_state(out_dir, step):
    ck = Checkpointer(os.path.join(str(out_dir), "checkpoints"))
    try:
        meta_free = ck._mngr.item_metadata(step)["state"]
        like = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta_free)
        state, _, _ = ck.restore(step, like)
    finally:
        ck.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    meshed = tmp_path_factory.mktemp("mesh")
    s1 = loop_lib.run(_cfg(single))
    s2 = loop_lib.run(_cfg(meshed, MESH))
    return single, meshed, s1, s2


def test_mesh_run_equals_single_device_run(runs):
    single, meshed, s1, s2 = runs
    assert s2["mesh"] == {"data": 1, "fsdp": 1, "expert": 2, "tensor": 2} and s1["mesh"] is None
    a = read_jsonl(os.path.join(str(single), "metrics.jsonl"))
    b = read_jsonl(os.path.join(str(meshed), "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra["step"], ra["loss"], rb["loss"])
        assert abs(ra["bias_norm"] - rb["bias_norm"]) <= 1e-5 * max(abs(ra["bias_norm"]), 1e-3)
    assert a[-1]["bias_norm"] > 0  # the aux-free bias moved
    va, vb = s1["validation"], s2["validation"]
    assert abs(va["loss"] - vb["loss"]) <= 1e-5 * va["loss"]
    assert abs(va["max_vio_global"] - vb["max_vio_global"]) <= 1e-4


def test_mesh_resume_is_bitwise(runs, tmp_path, capsys):
    _, meshed, _, _ = runs
    want = _final_state(meshed, 4)
    out = tmp_path / "resumed"
    shutil.copytree(str(meshed), str(out))
    shutil.rmtree(os.path.join(str(out), "checkpoints", "4"))
    with open(os.path.join(str(out), "config.json")) as f:  # the copy lives elsewhere: its recorded out_dir too
        recorded = json.load(f)
    recorded["loop.out_dir"] = str(out)
    with open(os.path.join(str(out), "config.json"), "w") as f:
        json.dump(recorded, f)
    summary = loop_lib.run(_cfg(out, MESH))
    assert summary["step"] == 4
    assert f"resuming {out} from step 2" in capsys.readouterr().out  # not a fresh start (also deterministic)
    got = _final_state(out, 4)
    flat_w, _ = jax.tree_util.tree_flatten_with_path(want)
    flat_g = jax.tree_util.tree_leaves(got)
    assert len(flat_w) == len(flat_g)
    for (path, w), g in zip(flat_w, flat_g):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
    steps = [r["step"] for r in read_jsonl(os.path.join(str(out), "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # the log was cut back to the checkpoint and continued, no duplicates


def test_two_processes_run_equals_single_device_run(runs, tmp_path):
    """`experiments.run --distributed` in 2 processes on localhost (gloo CPU collectives, 4 virtual devices
    each) with loop.mesh data=2,tensor=4: the data axis spans the processes, so the gradient reductions cross
    them. Process 0 alone writes the logs; its losses equal the single-device run's within 1e-5."""
    single, _, s1, _ = runs
    root = os.path.dirname(os.path.dirname(HERE))
    out = tmp_path / "two"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=4")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # as tests/parallel/multihost_worker.py: no shared cache
    port = free_port()
    cmd = [sys.executable, "-m", "experiments.run", "--distributed", f"--coordinator=localhost:{port}",
           "--num_processes=2", f"--config={os.path.join(os.path.dirname(HERE), 'train', 'loop_config.py')}",
           "--config.train.total_steps=4", "--config.loop.eval_every=4", f"--config.loop.out_dir={out}",
           "--config.loop.mesh=data=2,tensor=4"]
    run_processes([cmd + [f"--process_id={i}"] for i in range(2)], env, cwd=root)
    a = read_jsonl(os.path.join(str(single), "metrics.jsonl"))
    b = read_jsonl(os.path.join(str(out), "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # one writer: no duplicated records
    assert [r["lambda_"] for r in a] == [r["lambda_"] for r in b]  # one schedule (the MTP switch at step 3 of 4)
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra["step"], ra["loss"], rb["loss"])
    with open(os.path.join(str(out), "summary.json")) as f:
        summary = json.load(f)
    assert summary["processes"] == 2 and summary["mesh"] == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert abs(summary["validation"]["loss"] - s1["validation"]["loss"]) <= 1e-5 * s1["validation"]["loss"]
    assert sorted(os.listdir(os.path.join(str(out), "checkpoints"))) == ["2", "4"]


def test_mesh_that_does_not_divide_the_batch_is_refused(tmp_path):
    c = _cfg(tmp_path / "bad", "data=4")  # micro-batch 2 (batch 4 / grad_accum 2)
    with pytest.raises(loop_lib.RunError, match=r"loop.mesh='data=4'.*data.batch_size / loop.grad_accum = 2"):
        loop_lib.run(c)
    assert not os.path.exists(tmp_path / "bad")  # refused before anything was written
