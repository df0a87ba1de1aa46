"""Shared by tests/train: the tiny model's variables, built once per session.

They come from the model's own shapes (``jax.eval_shape`` of ``Transformer.init``: 0.5 s) filled with numpy draws
(kernels N(0, 0.02), norm gains 1, router bias 0) rather than from ``model.init``, whose jitted init compiles for
7-10 s on a 2-core CPU; ``model.init`` itself is tested in tests/test_model.py. The dense MoE dispatch compiles
fastest; the dispatches are held equal in tests/layers/test_moe.py."""

import pytest

from deepseek_jax import config

from testing_utils import random_variables

TINY = config.preset("tiny", moe_dispatch="dense")
SEQ = 8  # model input length T; batches carry T + 1 tokens


@pytest.fixture(scope="session")
def tiny_variables():
    return random_variables(TINY, SEQ)
