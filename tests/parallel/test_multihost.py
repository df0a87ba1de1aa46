"""Multi-controller run (issue 4, test 4): two processes on localhost, jax.distributed with CPU (gloo)
collectives, 4 virtual devices each, run the same train step as tests/parallel/test_sharded_step.py on an 8-device
mesh "expert=8" that spans both processes (so the expert all-to-all and the gradient reductions cross the process
boundary), and the gathered parameters, router bias and metrics equal the single-process, single-device result."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from parallel_common import CFG, make_tokens
from test_sharded_step import RTOL, _rel, _state, _train_cfg

from deepseek_jax.train.step import make_train_step

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the workers compile afresh (multihost_worker.py says why)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path), "expert=8"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            # ~35 s of CPU per process on an idle 2-core box; the generous wall limit is for loaded CI machines
            # (a hang in jax.distributed.initialize is bounded separately by its 60 s initialization_timeout)
            out, _ = p.communicate(timeout=600)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        pytest.fail("\n".join(f"process {i} exited {p.returncode}:\n{logs[i][-2500:]}" for i, p in enumerate(procs)))

    tc = _train_cfg()
    want, want_m = jax.device_get(jax.jit(make_train_step(CFG, tc))(
        _state(CFG, tc), {"tokens": make_tokens(CFG, n_micro=2, b=8)}))
    got = dict(np.load(os.path.join(tmp_path, "result.npz")))
    ref = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        {"params": want.params, "router": want.router})[0]}
    assert set(ref) <= set(got)
    for k, x in ref.items():
        assert _rel(got[k], x) <= (0.0 if k.startswith("['router']") else RTOL), k
    for k in ("loss", "ce", "grad_norm", "expert_load"):
        assert _rel(got[f"metric:{k}"], want_m[k]) <= RTOL, k
    assert float(got["metric:ep_dropped"]) == 0.0
