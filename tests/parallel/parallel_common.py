"""Shared by tests/parallel: the model config, its variables (numpy draws on the model's own shapes, like
tests/train/conftest.py: no model.init compile) and a token batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config
from deepseek_jax.model import Transformer

# The tiny preset's topology (MLA with q compression, group-limited routing over 8 experts, a shared expert,
# a dense first layer, MTP depth 1) cut to one dense and one MoE layer to keep compiles short.
CFG = config.preset("tiny", num_hidden_layers=2, moe_dispatch="dense")
SEQ = 8  # model input length T; batches carry T + 1 tokens


def make_variables(cfg, seed=0):
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))))
    rs = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.startswith("['router']"):  # a non-zero bias, so the bias takes part in routing
            return np.asarray(rs.normal(0.0, 0.01, s.shape), s.dtype)
        if name.endswith("['scale']"):
            return np.ones(s.shape, s.dtype)
        return np.asarray(rs.normal(0.0, 0.02, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_tokens(cfg, n_micro, b, seed=1):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, size=(n_micro, b, SEQ + 1)).astype(np.int32)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(cmds, env, cwd=None, timeout=600):
    """Start one process per command (the processes of one jax.distributed job), wait for all, kill leftovers;
    fail the test with each process's log tail if any exits non-zero. The wall limit is for loaded CI machines
    (a hang in jax.distributed.initialize is bounded separately by its initialization timeout)."""
    import subprocess

    import pytest
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        pytest.fail("\n".join(f"process {i} exited {p.returncode}:\n{logs[i][-2500:]}" for i, p in enumerate(procs)))
    return logs
