"""Multi-controller run: two processes on localhost, jax.distributed with CPU (gloo)
collectives, 4 virtual devices each, run the same train step as tests/parallel/test_sharded_step.py on an 8-device
mesh "expert=8" that spans both processes (so the expert all-to-all and the gradient reductions cross the process
boundary), and the gathered parameters, router bias and metrics equal the single-process, single-device result."""

import os
import sys

import jax
import numpy as np

from parallel_common import CFG, free_port, make_tokens, run_processes
from test_sharded_step import RTOL, _rel, _state, _train_cfg

from deepseek_jax.train.step import make_train_step

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def test_two_processes_match_single_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the workers compile afresh (multihost_worker.py says why)
    port = free_port()
    # ~35 s of CPU per process on an idle 2-core box
    run_processes([[sys.executable, WORKER, str(i), str(port), str(tmp_path), "expert=8"] for i in range(2)], env)

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
