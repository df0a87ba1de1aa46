"""Shared by tests/train: the tiny model's variables, built once per session.

They come from the model's own shapes (``jax.eval_shape`` of ``Transformer.init``: 0.5 s) filled with numpy draws
(kernels N(0, 0.02), norm gains 1, router bias 0) rather than from ``model.init``, whose jitted init compiles for
7-10 s on a 2-core CPU; ``model.init`` itself is tested in tests/test_model.py. The dense MoE dispatch compiles
fastest; the dispatches are held equal in tests/layers/test_moe.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config
from deepseek_jax.model import Transformer

TINY = config.preset("tiny", moe_dispatch="dense")
SEQ = 8  # model input length T; batches carry T + 1 tokens


@pytest.fixture(scope="session")
def tiny_variables():
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: Transformer(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))))
    rs = np.random.RandomState(0)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.startswith("['router']"):
            return jnp.zeros(s.shape, s.dtype)
        if name.endswith("['scale']"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rs.normal(0.0, 0.02, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
