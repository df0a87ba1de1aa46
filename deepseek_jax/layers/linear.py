"""The one Dense layer used everywhere. Its ``dot_general`` is the precision-policy hook: BF16/FP32 today, the
block-scaled FP8 GEMM (ops/fp8.py) for the layers the paper runs in FP8.

Kernels are stored [in, out] (Hugging Face stores [out, in]; hf.py transposes) with logical axis names, so one
rules table (sharding.py) decides how every weight is sharded.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DotGeneral = Callable[..., jax.Array]


def dtype_of(name) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
    return jnp.dtype(name)


class Dense(nn.Module):
    """y = x @ W, no bias. ``kernel_axes`` names the logical axes of W = (in, out)."""

    features: int
    kernel_axes: Sequence[Optional[str]] = (None, None)
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.006
    dot_general: Optional[DotGeneral] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), tuple(self.kernel_axes)),
            (x.shape[-1], self.features), dtype_of(self.param_dtype))
        return linear(x, kernel, self.dtype, self.dot_general)


def linear(x: jax.Array, kernel: jax.Array, dtype="float32", dot_general: Optional[DotGeneral] = None):
    """x[..., in] @ kernel[in, out] in ``dtype`` through the policy's dot_general."""
    dt = dtype_of(dtype)
    dot = dot_general or jax.lax.dot_general
    # Flatten leading axes to one 2-D GEMM: XLA:CPU's backward of a 3-D dot_general (the weight gradient
    # contracts over batch and sequence) ran ~1.7x slower than the 2-D one here.
    lead = x.shape[:-1]
    y = dot(x.reshape(-1, x.shape[-1]).astype(dt), kernel.astype(dt), (((1,), (0,)), ((), ())))
    return y.reshape(*lead, kernel.shape[-1])


class Kernel(nn.Module):
    """A bare weight with logical axes, for layers that use their kernel in more than one way (MLA's kv_b:
    expanded on the naive path, absorbed into q and o on the decode path). Same tree as Dense: {kernel}."""

    shape: Sequence[int]
    axes: Sequence[Optional[str]]
    param_dtype: str = "float32"
    init_std: float = 0.006

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                 tuple(self.axes)),
                          tuple(self.shape), dtype_of(self.param_dtype))
