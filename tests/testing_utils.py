"""Helpers shared by several test files (imported as ``testing_utils``: pytest puts tests/ on sys.path)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import Transformer


def change_one_stored_value(step_dir: str, array: str) -> str:
    """Add 1 to the first element of one array (orbax's dotted name, e.g. "params.embed.embedding") of a checkpoint
    step's state item, rewritten through TensorStore, the storage layer orbax reads with (zarr arrays in an OCDBT
    key-value store; the write appends a data file and a new manifest). Every file stays well-formed, so the
    restore itself succeeds and only the content checksums can tell, unlike flipping raw bytes, which may land in
    a zstd frame or an OCDBT node that TensorStore itself rejects first. Returns the leaf's key as the checksum
    error names it ("params/embed/embedding")."""
    import tensorstore as ts  # orbax's own dependency

    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": "file://" + os.path.abspath(
        os.path.join(step_dir, "state")), "path": array + "/"}}
    arr = ts.open(spec, open=True).result()
    values = arr.read().result()
    old = values.flat[0].copy()
    values.flat[0] = old + 1
    assert values.flat[0] != old
    arr.write(values).result()
    np.testing.assert_array_equal(ts.open(spec, open=True).result().read().result(), values)  # decodes, changed
    return array.replace(".", "/")


def random_variables(cfg, seq_len: int, std: float = 0.02, seed: int = 0):
    """A model's variables from its own shapes (``jax.eval_shape`` of ``Transformer.init``, ~0.5 s) filled with numpy
    draws: kernels N(0, std), norm gains 1, router bias 0. ``model.init`` compiles for 7-10 s on a 2-core CPU and is
    tested on its own in tests/test_model.py; tests that only need some weights use this."""
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))))
    rs = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.startswith("['router']"):
            return jnp.zeros(s.shape, s.dtype)
        if name.endswith("['scale']"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rs.normal(0.0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
