"""Block-scaled FP8 training, simulated (V3 §3.3, App. B; docs/fp8.md).

Quantizers. ``quantize(x[R, C], block=(br, bc))`` gives ``q`` (float8, same shape) and one fp32 scale per
``br x bc`` block, ``s [ceil(R/br), ceil(C/bc)]``, with x ~= q * s:
  1x128 tiles   (1, 128)    activations and output gradients: per token, per 128 channels (§3.3.1)
  128x1 tiles   (128, 1)    the same tensors re-tiled along tokens for the weight gradient
  128x128 blocks (128, 128) weights (per 128 input x 128 output channels)
Scales are online (current max-abs of the block, no amax history): s = amax / fmax (fmax = 448 for E4M3, 57344
for E5M2; computed as amax * fp32(1/fmax)), or the next power of two >= that with ``pow2``. An all-zero block gets
s = 1 and zeros (not NaN); a block holding inf/NaN gets a NaN scale, so a non-finite activation poisons its
outputs loudly. Shapes that are
not multiples of the block are zero-padded for the statistics only.

GEMMs. ``block_gemm`` computes C[M, N] = deq(a)[M, K] deq(b)[N, K]^T for K-major operands with any of the
tilings, by the XLA reference (dequantize to fp32, one fp32 matmul: exact promotion) or a Pallas kernel
(ops/fp8_pallas.py, which can also emulate limited-precision accumulation; ``Fp8Config.kernel`` picks the form).
On a mesh (``sharding.use_mesh``) every Pallas call runs inside ``shard_map``: no Pallas kernel can be
partitioned by XLA (docs/fp8.md "Sharding").

``fp8_linear(x[M, K], w[K, N], cfg)``: y = x w with a custom VJP in which all three GEMMs take FP8 inputs with
the paper's tilings (Fig. 6, App. B.2):
  Fprop  Y  = X W          X: 1x128 tiles along K          W: 128x128 blocks
  Dgrad  dX = dY W^T       dY: 1x128 tiles along N         W: the same blocks (its FP8 copy and scales, reused)
  Wgrad  dW = X^T dY       X^T: 1x128 tiles along M (= 128x1 tiles of X), requantized from the cached FP8 X;
                           dY^T: 1x128 tiles along M (= 128x1 tiles of dY)
The residuals saved for the backward pass are the FP8 tensors and their scales (X_q, s_X, W_q, s_W), never the
high-precision activation. Y and dX come out in the input's dtype (BF16 in a BF16 model; the paper's outputs
are BF16), dW in fp32 cast to the weight's dtype (fp32 master weights). Our weights are stored [in, out] = [K, N];
the spec writes W [N, K]; the 128x128 blocks are the same, so only the scale array is transposed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import compat, sharding
from deepseek_jax.config import Fp8Config
from deepseek_jax.ops import fp8_pallas

TILE = 128
FORMATS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
TILE_1x128 = (1, TILE)
TILE_128x1 = (TILE, 1)
BLOCK_128x128 = (TILE, TILE)


def fp8_dtype(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"fp8 format must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def fp8_max(fmt: str) -> float:
    return float(jnp.finfo(fp8_dtype(fmt)).max)  # 448 (E4M3), 57344 (E5M2)


def _pad_to(x, br: int, bc: int, value=0):
    R, C = x.shape
    return jnp.pad(x, ((0, -R % br), (0, -C % bc)), constant_values=value)


def _pow2_ceil(s):
    """Smallest power of two >= s (s > 0, finite), exactly: frexp gives s = m 2^e with m in [0.5, 1)."""
    m, e = jnp.frexp(s)
    e = jnp.where(m == 0.5, e - 1, e)
    return jnp.ldexp(jnp.ones_like(s), e)


def block_scales(x: jax.Array, block: Tuple[int, int], fmt: str = "e4m3", pow2: bool = False) -> jax.Array:
    """One fp32 scale per block of x [R, C]: [ceil(R/br), ceil(C/bc)] (see the module docstring)."""
    if x.ndim != 2:
        raise ValueError(f"quantize: x must be 2-D [R, C], got shape {x.shape}")
    br, bc = block
    xp = _pad_to(x.astype(jnp.float32), br, bc)
    Rb, Cb = xp.shape[0] // br, xp.shape[1] // bc
    amax = jnp.abs(xp.reshape(Rb, br, Cb, bc)).max(axis=(1, 3))
    # amax * (1/fmax), written as the multiply XLA would turn a division by a constant into anyway: one rounding
    # rule on every backend (a 1-ulp scale difference can flip an x / s that sits on an fp8 rounding tie).
    s = amax * jnp.float32(1.0 / fp8_max(fmt))
    if pow2:
        s = _pow2_ceil(jnp.where(s > 0, s, 1.0))
    s = jnp.where(s > 0, s, 1.0)  # all-zero (or fully underflowing) block -> zeros, not NaN
    return jnp.where(jnp.isfinite(amax), s, jnp.nan)


def expand_scales(s: jax.Array, block: Tuple[int, int], shape: Tuple[int, int]) -> jax.Array:
    """Per-block scales broadcast back to the element grid of ``shape``."""
    br, bc = block
    return jnp.repeat(jnp.repeat(s, br, axis=0), bc, axis=1)[:shape[0], :shape[1]]


def quantize(x: jax.Array, block: Tuple[int, int], fmt: str = "e4m3", pow2: bool = False):
    """x [R, C] -> (q [R, C] float8, s [ceil(R/br), ceil(C/bc)] fp32), x ~= q * s blockwise."""
    s = block_scales(x, block, fmt, pow2)
    fmax = fp8_max(fmt)
    scaled = x.astype(jnp.float32) / expand_scales(s, block, x.shape)
    # Clip: float8_e4m3fn has no inf, so an overflowing cast would give NaN; NaN itself passes through.
    return jnp.clip(scaled, -fmax, fmax).astype(fp8_dtype(fmt)), s


def dequantize(q: jax.Array, s: jax.Array, block: Tuple[int, int]) -> jax.Array:
    return q.astype(jnp.float32) * expand_scales(s, block, q.shape)


def quantize_1x128(x, fmt="e4m3", pow2=False):
    return quantize(x, TILE_1x128, fmt, pow2)


def quantize_128x1(x, fmt="e4m3", pow2=False):
    return quantize(x, TILE_128x1, fmt, pow2)


def quantize_128x128(x, fmt="e4m3", pow2=False):
    return quantize(x, BLOCK_128x128, fmt, pow2)


# ---------------------------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------------------------
def fp8_matmul_ref(a_q, a_s, a_block, b_q, b_s, b_block) -> jax.Array:
    """Dequantize-then-matmul reference: C[M, N] = deq(a)[M, K] deq(b)[N, K]^T in fp32 (exact products of the
    fp8 values times their scales; XLA's fp32 accumulation, i.e. promotion at every element)."""
    a = dequantize(a_q, a_s, a_block)
    b = dequantize(b_q, b_s, b_block)
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


def on_mesh(gemm, a_q, a_s, b_q, b_s, tokens: str = "m"):
    """``gemm(a_q, a_s, b_q, b_s) -> [M, N]`` run per device under ``shard_map`` when a mesh is active
    (``sharding.use_mesh``) and we are not already inside a manual (shard_map) region. The batch axes split the
    token dimension: ``tokens="m"`` (Fprop, Dgrad: the rows of a are tokens) splits M when it divides, and
    ``tokens="k"`` (Wgrad: the contraction runs over tokens) splits K when each device keeps whole 128-blocks,
    summing the per-device fp32 results (psum). Otherwise every device computes the whole GEMM (replicated:
    correct, redundant). The "tensor" axis replicates."""
    mesh = sharding.active_mesh()
    if mesh is None or compat.manual_axes():
        return gemm(a_q, a_s, b_q, b_s)
    sizes = sharding.axis_sizes(mesh)
    if math.prod(sizes.values()) == 1:
        return gemm(a_q, a_s, b_q, b_s)
    ba = tuple(a for a in sharding.BATCH_AXES if sizes[a] > 1)
    n = math.prod(sizes[a] for a in ba)
    reduce = False
    if ba and tokens == "m" and a_q.shape[0] % n == 0:
        in_specs, out_spec = (P(ba), P(ba), P(), P()), P(ba)
    elif ba and tokens == "k" and a_q.shape[1] % (n * TILE) == 0 and b_s.shape[1] % n == 0:
        in_specs, out_spec, reduce = (P(None, ba),) * 4, P(), True
    else:
        in_specs, out_spec = (P(),) * 4, P()

    def body(*ops):
        y = gemm(*ops)
        return jax.lax.psum(y, ba) if reduce else y

    ops = [compat.reshard(x, mesh, sp) for x, sp in zip((a_q, a_s, b_q, b_s), in_specs)]
    return sharding.shard_map(body, mesh, in_specs, out_spec)(*ops)


def block_gemm(a_q, a_s, a_block, b_q, b_s, b_block, cfg: Fp8Config, tokens: str = "m") -> jax.Array:
    """C[M, N] (fp32) from K-major FP8 operands, by ``cfg.backend``. The Pallas kernels take 1x128 tiles along K
    for ``a`` and 1x128 tiles or 128x128 blocks for ``b``; other tilings are for the reference only.
    ``tokens``: which dimension holds tokens ("m" or "k"), for the per-device split of :func:`on_mesh`."""
    if cfg.backend == "xla":
        return fp8_matmul_ref(a_q, a_s, a_block, b_q, b_s, b_block)
    if a_block != TILE_1x128 or b_block not in (TILE_1x128, BLOCK_128x128):
        raise ValueError(f"block_gemm: the Pallas kernel takes a in 1x128 tiles and b in 1x128 tiles or 128x128 "
                         f"blocks, got a {a_block}, b {b_block}")
    gemm = functools.partial(fp8_pallas.fp8_gemm, accum=cfg.accum, mantissa_bits=cfg.mantissa_bits,
                             promote_every=cfg.promote_every, kernel=cfg.kernel, interpret=cfg.interpret)
    return on_mesh(gemm, a_q, a_s, b_q, b_s, tokens)


# ---------------------------------------------------------------------------------------------------------------
# The FP8 linear layer (custom VJP)
# ---------------------------------------------------------------------------------------------------------------
def _quant_fwd(x_mk, w_kn, cfg: Fp8Config):
    fmt, p2 = cfg.fmt, cfg.pow2_scales
    xq, sx = quantize(x_mk, TILE_1x128, fmt, p2)  # [M, K], [M, K/128]
    wq, sw = quantize(w_kn, BLOCK_128x128, fmt, p2)  # [K, N], [K/128, N/128]
    return xq, sx, wq, sw


def _fprop(xq, sx, wq, sw, cfg):
    # b = W^T [N, K] (K-major); its 128x128 blocks are W's, scales transposed.
    return block_gemm(xq, sx, TILE_1x128, wq.T, sw.T, BLOCK_128x128, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_linear(x_mk: jax.Array, w_kn: jax.Array, cfg: Fp8Config) -> jax.Array:
    """y[M, N] = x[M, K] w[K, N] with all three GEMMs in FP8 (module docstring). Output in x's dtype."""
    xq, sx, wq, sw = _quant_fwd(x_mk, w_kn, cfg)
    return _fprop(xq, sx, wq, sw, cfg).astype(x_mk.dtype)


def _fp8_linear_fwd(x_mk, w_kn, cfg):
    xq, sx, wq, sw = _quant_fwd(x_mk, w_kn, cfg)
    y = _fprop(xq, sx, wq, sw, cfg).astype(x_mk.dtype)
    # FP8 residuals only (plus zero-size dtype carriers): never the high-precision x or w.
    return y, (xq, sx, wq, sw, jnp.zeros((0,), x_mk.dtype), jnp.zeros((0,), w_kn.dtype))


def _fp8_linear_bwd(cfg, res, dy_mn):
    xq, sx, wq, sw, x_dt, w_dt = res
    fmt, p2 = cfg.fmt, cfg.pow2_scales
    # Dgrad: dX[M, K] = dY[M, N] W[K, N]^T; dY in 1x128 tiles along N; W's FP8 blocks reused as the K-major b.
    dyq, sdy = quantize(dy_mn, TILE_1x128, fmt, p2)
    dx = block_gemm(dyq, sdy, TILE_1x128, wq, sw, BLOCK_128x128, cfg)
    # Wgrad: dW[K, N] = X^T dY, contraction over tokens M: both operands 1x128-tiled along M.
    x_deq = dequantize(xq, sx, TILE_1x128)
    xtq, sxt = quantize(x_deq.T, TILE_1x128, fmt, p2)  # [K, M] = 128x1 tiles of X
    dytq, sdyt = quantize(dy_mn.T, TILE_1x128, fmt, p2)  # [N, M] = 128x1 tiles of dY
    dw = block_gemm(xtq, sxt, TILE_1x128, dytq, sdyt, TILE_1x128, cfg, tokens="k")
    return dx.astype(x_dt.dtype), dw.astype(w_dt.dtype)


fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


@dataclasses.dataclass(frozen=True)
class Fp8DotGeneral:
    """The ``dot_general`` hook of layers/linear.py for the FP8 layers: accepts exactly the 2-D [M, K] x [K, N]
    contraction that ``linear`` issues and runs it through :func:`fp8_linear`. ``linear_fn`` is the same GEMM as
    a plain function, for the routed experts (layers/moe.py)."""

    cfg: Fp8Config

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if lhs.ndim != 2 or rhs.ndim != 2 or tuple(map(tuple, dimension_numbers[0])) != ((1,), (0,)) \
                or any(dimension_numbers[1]):
            raise ValueError(f"Fp8DotGeneral: only the 2-D [M, K] x [K, N] contraction is supported, got lhs "
                             f"{lhs.shape}, rhs {rhs.shape}, dimension_numbers {dimension_numbers}")
        y = fp8_linear(lhs, rhs, self.cfg)
        return y if preferred_element_type is None else y.astype(preferred_element_type)

    def linear_fn(self, x_mk, w_kn):
        return fp8_linear(x_mk, w_kn, self.cfg)


def dot_general_for(cfg_fp8: Optional[Fp8Config]):
    """The model's dot_general policy: None (plain lax.dot_general) or the FP8 one."""
    return None if cfg_fp8 is None else Fp8DotGeneral(cfg_fp8)
