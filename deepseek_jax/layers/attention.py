"""Multi-head Latent Attention (V2 §2.1, V3 §2.1.1, eqs. 1-11).

Keys and values are generated from one low-rank latent per token, c_kv = RMSNorm(W_DKV h) (eq. 1), plus one
rope key k_R = RoPE(W_KR h) shared by all heads (eq. 3). Queries may be compressed too (q_lora_rank, eqs. 6-8).

Two computations of the same function:
- naive (training, reference): expand the latent into per-head k_nope and v with kv_b, concatenate the rope
  part, ordinary attention;
- absorbed (decode): fold kv_b's key half into the query (q_lat = q_nope W_UK^T) and its value half into the
  output (o = (p c_kv) W_UV), so attention runs against the cached latent directly and nothing per-head is ever
  materialised for the keys. The cache holds exactly (kv_lora_rank + qk_rope_head_dim) numbers per token.

Scores and softmax are fp32 whatever the compute dtype; the attention core is never FP8 (V3 §3.3).

The naive path's attention core (``cfg.attention_impl``; BUILD.md "Attention kernels"):
  xla      softmax(q k^T * scale) v as einsums, [B, H, T, S] fp32 scores materialised;
  chunked  the same in query chunks of ``cfg.attn_chunk`` rows, each rematerialised (``_naive_core``);
  cudnn    ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused (flash) attention: no scores in
           memory. The public call wants v as wide as q/k, so v [.., dv] is zero-padded to qk_head_dim and the output
           sliced back (zero columns of v give zero output columns; cuDNN >= 9.10 on Hopper also takes dv < dk
           natively, which the public call does not expose); ``scale=`` is the YaRN-corrected softmax scale. The
           mask is causal by index (query t sees keys 0..t), which is the position mask when positions increase
           along T (the model's default 0..T-1); rows whose positions do not increase come out NaN, never
           silently wrong. Only without a cache (training, eval, the MTP modules); a cache uses xla / chunked;
  auto     cudnn on a GPU when the shapes allow it (bf16/fp16, qk_head_dim <= 256 and a multiple of 8; > 128 needs
           Hopper), else chunked when attn_chunk > 0, else xla.
The absorbed (decode) path keeps its own einsums: its head width kv_lora_rank + qk_rope = 576 is beyond cuDNN's 256.

``GQA`` is the ablation baseline (``cfg.attention`` = "mha" | "gqa"; V2 App. D compares MLA with MHA): ordinary
per-head keys and values, ``cfg.kv_heads`` of them shared by groups of query heads (query head h reads KV head
h // (H / kv_heads), the layout of transformers' ``repeat_kv``). It keeps everything else of MLA so that only the
KV path differs: the same query path (q compression when q_lora_rank is set), the same head dims (q/k:
qk_nope + qk_rope, v: v_head_dim), the same RoPE/YaRN function applied to the last qk_rope_head_dim dims of every
query and key head (partial rotary; MLA shares that rope key across heads, GQA gives each KV head its own), the
same softmax scale. Its cache holds kv_heads * (qk_nope + qk_rope + v_head_dim) numbers per token per layer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Dense, Kernel, dtype_of, linear
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin, softmax_scale

# The latent norms use eps 1e-6 in both references, whatever rms_norm_eps says (docs/checkpoint_format.md).
LATENT_NORM_EPS = 1e-6

Cache = dict  # {"c_kv": [B, S, kv_lora_rank], "k_rope": [B, S, qk_rope_head_dim]}


def init_layer_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype="float32") -> Cache:
    """An empty cache for one attention layer: MLA's latent one, or per-head {"k", "v"} for MHA/GQA."""
    dt = dtype_of(dtype)
    if cfg.attention != "mla":
        return {"k": jnp.zeros((batch_size, max_len, cfg.kv_heads, cfg.qk_head_dim), dt),
                "v": jnp.zeros((batch_size, max_len, cfg.kv_heads, cfg.v_head_dim), dt)}
    return {"c_kv": jnp.zeros((batch_size, max_len, cfg.kv_lora_rank), dt),
            "k_rope": jnp.zeros((batch_size, max_len, cfg.qk_rope_head_dim), dt)}


def _write_cache(cache: Cache, c_kv_btr, k_rope_btd, positions_bt) -> Cache:
    b = jnp.arange(positions_bt.shape[0])[:, None]
    return {"c_kv": cache["c_kv"].at[b, positions_bt].set(c_kv_btr.astype(cache["c_kv"].dtype)),
            "k_rope": cache["k_rope"].at[b, positions_bt].set(k_rope_btd.astype(cache["k_rope"].dtype))}


def _masked_softmax(scores_bhts, q_pos_bt, k_pos_bs):
    """Causal by position: key s is visible to query t iff pos(s) <= pos(t). fp32 in, fp32 out."""
    visible = k_pos_bs[:, None, None, :] <= q_pos_bt[:, None, :, None]
    scores = jnp.where(visible, scores_bhts, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _naive_core(q_nope, q_rope, k_nope, k_rope, v, q_pos_bt, k_pos_bs, scale, dt, chunk: int,
                causal_blocks: int = 1):
    """softmax(mask(q_nope k_nope^T + q_rope k_rope^T) * scale) v -> [B, T, H, dv], fp32 scores (V3 eqs. 10-11).

    chunk > 0 and T > chunk: the queries go through in chunks of ``chunk`` rows (``lax.map``; T padded up to a
    multiple, padding rows dropped), each chunk under ``jax.checkpoint``, so the largest attention tensors alive in
    the forward and the backward pass are [B, H, chunk, S] instead of [B, H, T, S] (every chunk still sees all S
    keys: the same softmax, not an online one). Costs one extra score computation in the backward pass.

    causal_blocks > 1 (the keys are the queries' own tokens, no cache; chunk == 0): the queries go through in
    that many blocks along T, block i attending only to the keys up to its own last row, so the score blocks above
    the diagonal, which the causal mask would zero, are never computed ((n-1)/2n of the scores skipped). Exact when
    positions increase along T (training, evaluation, MTP): every skipped key is then later than every query of
    the block. A batch row whose positions do not increase comes out NaN in the blocks where a skipped key would
    have been visible, never silently wrong."""
    f32 = jnp.float32
    # q_nope k_nope^T + q_rope k_rope^T as one matmul over the concatenated head dim (nope | rope), the shared
    # rope key broadcast over the heads: the same sum, one [.., dn + dr]-deep contraction instead of two shallow
    # ones (on CPU this halves the core's forward+backward time).
    k_qk = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])], -1)

    def core(qn, qr, qp, n_keys=None):  # n_keys: attend to the first n_keys keys only (_causal_blocks)
        kq, vv, kp = (k_qk, v, k_pos_bs) if n_keys is None else (k_qk[:, :n_keys], v[:, :n_keys],
                                                                  k_pos_bs[:, :n_keys])
        q = jnp.concatenate([qn, qr], -1)
        scores = jnp.einsum("bthk,bshk->bhts", q, kq, preferred_element_type=f32) * scale
        p = _masked_softmax(scores, qp, kp).astype(dt)
        return jnp.einsum("bhts,bshv->bthv", p, vv)

    B, T = q_nope.shape[:2]
    if causal_blocks > 1 and not chunk and T >= 2 * causal_blocks:
        return _causal_blocks(core, q_nope, q_rope, k_qk, v, q_pos_bt, causal_blocks)
    if not chunk or T <= chunk:
        return core(q_nope, q_rope, q_pos_bt)
    n = -(-T // chunk)

    def split(a):  # [B, T, ...] -> [n, B, chunk, ...]; padding queries sit at position 0 (they see key 0 only)
        a = jnp.pad(a, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape((B, n, chunk) + a.shape[2:]).swapaxes(0, 1)

    o = jax.lax.map(lambda args: jax.checkpoint(core)(*args), (split(q_nope), split(q_rope), split(q_pos_bt)))
    return o.swapaxes(0, 1).reshape((B, n * chunk) + o.shape[3:])[:, :T]


def _causal_blocks(core, q_nope, q_rope, k_qk, v, pos_bt, n: int):
    """``core`` over n query blocks along T, block i against keys [0, end_i) only (see _naive_core)."""
    T = q_nope.shape[1]
    bounds = [round(i * T / n) for i in range(n + 1)]
    outs = []
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        o = core(q_nope[:, a:b], q_rope[:, a:b], pos_bt[:, a:b], n_keys=b)
        if b < T:  # a skipped key visible to some query of the block: poison that batch row's block
            bad_b = pos_bt[:, b:].min(1) <= pos_bt[:, a:b].max(1)
            o = jnp.where(bad_b[:, None, None, None], jnp.asarray(jnp.nan, o.dtype), o)
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


# Query blocks of the causal XLA core on the training path (_naive_core's causal_blocks): 4 skips 3/8 of the
# scores; on CPU it cuts the core's forward+backward time by a third at T = 256 and by half at T = 128.
CAUSAL_BLOCKS = 4


# jax.nn.dot_product_attention's implementation for attention_impl="cudnn" (tests swap in "xla": the same call,
# the same padding and scale, XLA's math).
CUDNN_IMPLEMENTATION = "cudnn"
CUDNN_MAX_HEAD_DIM = 256  # cuDNN flash attention: head dim <= 256 on Hopper and later, <= 128 before


def _gpu_compute_capability() -> Optional[Tuple[int, ...]]:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    try:
        return tuple(int(c) for c in str(cc).split("."))
    except ValueError:
        return None


def resolve_attention_impl(cfg: ModelConfig, has_cache: bool) -> str:
    """The attention core a naive-path call runs: "xla" | "chunked" | "cudnn" (module docstring)."""
    chunked_or_xla = "chunked" if cfg.attn_chunk > 0 else "xla"
    impl = cfg.attention_impl
    if impl == "cudnn":
        return chunked_or_xla if has_cache else "cudnn"
    if impl != "auto":
        return impl
    if has_cache or jax.default_backend() != "gpu" or not cudnn_shapes_ok(cfg):
        return chunked_or_xla
    cc = _gpu_compute_capability()
    if cfg.qk_head_dim > 128 and (cc is None or cc < (9, 0)):
        return chunked_or_xla
    return "cudnn"


def cudnn_shapes_ok(cfg: ModelConfig) -> bool:
    """cuDNN's fused attention takes these shapes (v is padded to the q/k width, so only qk_head_dim counts)."""
    return (cfg.dtype in ("bfloat16", "float16") and cfg.qk_head_dim <= CUDNN_MAX_HEAD_DIM
            and cfg.qk_head_dim % 8 == 0)


def fused_attention(q_bthk, k_bsgk, v_bsgv, q_pos_bt, scale: float, dt, implementation: str = None):
    """Causal softmax(q k^T * scale) v through ``jax.nn.dot_product_attention`` -> [B, T, H, dv].

    q [B, T, H, dk], k [B, S, G, dk], v [B, S, G, dv] (G divides H: query head h reads KV head h // (H / G)).
    v is zero-padded to dk and the output sliced back to dv (odd T: one more zero query/key, sliced off); rows
    whose positions are not increasing along T
    (where causal-by-index is not causal-by-position) are NaN."""
    dk, dv = q_bthk.shape[-1], v_bsgv.shape[-1]
    if dv > dk:
        raise ValueError(f"fused_attention: v head dim {dv} > q/k head dim {dk} (only padding v up is supported)")
    T, S = q_bthk.shape[1], k_bsgk.shape[1]
    # jax's cuDNN backward wants even sequence lengths (the MTP module's T - k is often odd): one zero query and
    # one zero key are appended; under the causal mask no real query sees the appended key (it comes after them).
    pad_t = (T % 2, S % 2) if T == S else (0, 0)
    q = jnp.pad(q_bthk.astype(dt), [(0, 0), (0, pad_t[0]), (0, 0), (0, 0)])
    k = jnp.pad(k_bsgk.astype(dt), [(0, 0), (0, pad_t[1]), (0, 0), (0, 0)])
    v_pad = jnp.pad(v_bsgv.astype(dt), [(0, 0), (0, pad_t[1]), (0, 0), (0, dk - dv)])
    o = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=True,
                                     implementation=implementation or CUDNN_IMPLEMENTATION)[:, :T, :, :dv]
    increasing_b = jnp.all(q_pos_bt[:, 1:] > q_pos_bt[:, :-1], axis=1)
    return jnp.where(increasing_b[:, None, None, None], o, jnp.asarray(jnp.nan, o.dtype))


def _mla_fused_core(q_nope, q_rope, k_nope, k_rope, v, q_pos_bt, scale, dt, implementation: str = None):
    """MLA through ``fused_attention``: q = [q_nope, q_rope], k = [k_nope, k_rope broadcast over heads]."""
    H = q_nope.shape[2]
    k_rope_bshd = jnp.broadcast_to(k_rope[:, :, None, :].astype(dt), k_rope.shape[:2] + (H, k_rope.shape[-1]))
    q = jnp.concatenate([q_nope.astype(dt), q_rope.astype(dt)], -1)
    k = jnp.concatenate([k_nope.astype(dt), k_rope_bshd], -1)
    return fused_attention(q, k, v, q_pos_bt, scale, dt, implementation)


class MLA(nn.Module):
    cfg: ModelConfig
    dot_general: Optional[object] = None  # precision policy for the projections (FP8 hook)

    @nn.compact
    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, cache: Optional[Cache] = None,
                 absorb: bool = False) -> Tuple[jax.Array, Optional[Cache]]:
        """x [B, T, d] -> ([B, T, d], updated cache or None).

        positions_bt: absolute positions of the T tokens. With a cache (slot index == position), the new
        latents are written at those positions and the queries attend over every cached slot up to their
        own position. ``absorb`` selects the absorbed computation (same numbers, latent-only).
        """
        cfg = self.cfg
        B, T, _ = x_btd.shape
        H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank)
        dense = lambda feats, axes, name: Dense(feats, axes, cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                                                self.dot_general, name=name)
        # Queries (eqs. 6-10).
        if cfg.q_lora_rank is None:
            q = dense(H * (dn + dr), ("embed", "q_heads"), "q_proj")(x_btd)
        else:
            c_q = dense(cfg.q_lora_rank, ("embed", "q_lora"), "q_a_proj")(x_btd)
            c_q = RMSNorm(LATENT_NORM_EPS, cfg.param_dtype, "q_lora", name="q_a_norm")(c_q)
            q = dense(H * (dn + dr), ("q_lora", "q_heads"), "q_b_proj")(c_q)
        q = q.reshape(B, T, H, dn + dr)
        q_nope, q_rope = q[..., :dn], q[..., dn:]
        # Latent KV and the shared rope key (eqs. 1, 3).
        kv_a = dense(r + dr, ("embed", "kv_lora"), "kv_a_proj")(x_btd)
        c_kv = RMSNorm(LATENT_NORM_EPS, cfg.param_dtype, "kv_lora", name="kv_a_norm")(kv_a[..., :r])
        cos, sin = rope_cos_sin(cfg, positions_bt)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(kv_a[..., r:], cos, sin)
        w_kvb = Kernel((r, H * (dn + dv)), ("kv_lora", "kv_heads"), cfg.param_dtype, cfg.initializer_range,
                       name="kv_b_proj")()

        new_cache = None
        if cache is not None:
            new_cache = _write_cache(cache, c_kv, k_rope, positions_bt)
            keys_c, keys_r = new_cache["c_kv"].astype(c_kv.dtype), new_cache["k_rope"].astype(k_rope.dtype)
            k_pos = jnp.broadcast_to(jnp.arange(keys_c.shape[1])[None], (B, keys_c.shape[1]))
        else:
            keys_c, keys_r, k_pos = c_kv, k_rope, positions_bt

        scale = softmax_scale(cfg)
        f32 = jnp.float32
        dt = dtype_of(cfg.dtype)
        if absorb:
            w = w_kvb.astype(dt).reshape(r, H, dn + dv)
            w_uk, w_uv = w[..., :dn], w[..., dn:]
            q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
            scores = (jnp.einsum("bthr,bsr->bhts", q_lat, keys_c, preferred_element_type=f32)
                      + jnp.einsum("bthd,bsd->bhts", q_rope, keys_r, preferred_element_type=f32)) * scale
            p = _masked_softmax(scores, positions_bt, k_pos).astype(dt)
            o_lat = jnp.einsum("bhts,bsr->bthr", p, keys_c)
            o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
        else:
            kv = linear(keys_c, w_kvb, cfg.dtype, self.dot_general).reshape(B, keys_c.shape[1], H, dn + dv)
            k_nope, v = kv[..., :dn], kv[..., dn:]
            impl = resolve_attention_impl(cfg, cache is not None)
            if impl == "cudnn":
                o = _mla_fused_core(q_nope, q_rope, k_nope, keys_r, v, positions_bt, scale, dt)
            else:
                o = _naive_core(q_nope, q_rope, k_nope, keys_r, v, positions_bt, k_pos, scale, dt,
                                cfg.attn_chunk if impl == "chunked" else 0,
                                causal_blocks=CAUSAL_BLOCKS if cache is None else 1)
        out = dense(cfg.hidden_size, ("o_heads", "embed"), "o_proj")(o.reshape(B, T, H * dv))
        return out, new_cache


def _query(cfg: ModelConfig, dense, x_btd):
    """The query path shared by MLA and GQA (eqs. 6-8): [B, T, H * (qk_nope + qk_rope)]."""
    if cfg.q_lora_rank is None:
        return dense(cfg.num_attention_heads * cfg.qk_head_dim, ("embed", "q_heads"), "q_proj")(x_btd)
    c_q = dense(cfg.q_lora_rank, ("embed", "q_lora"), "q_a_proj")(x_btd)
    c_q = RMSNorm(LATENT_NORM_EPS, cfg.param_dtype, "q_lora", name="q_a_norm")(c_q)
    return dense(cfg.num_attention_heads * cfg.qk_head_dim, ("q_lora", "q_heads"), "q_b_proj")(c_q)


class GQA(nn.Module):
    """Multi-head (kv_heads == H) or grouped-query attention with per-head keys and values: the baseline MLA is
    compared against (see the module docstring for what it shares with MLA). Same call signature as ``MLA``;
    ``absorb`` is accepted and ignored (there is no latent to absorb into)."""

    cfg: ModelConfig
    dot_general: Optional[object] = None

    @nn.compact
    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, cache: Optional[Cache] = None,
                 absorb: bool = False) -> Tuple[jax.Array, Optional[Cache]]:
        cfg = self.cfg
        B, T, _ = x_btd.shape
        H, G, dn, dr, dv = (cfg.num_attention_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim)
        dk = dn + dr
        dense = lambda feats, axes, name: Dense(feats, axes, cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                                                self.dot_general, name=name)
        q_bthk = _query(cfg, dense, x_btd).reshape(B, T, H, dk)
        k_btgk = dense(G * dk, ("embed", "kv_heads"), "k_proj")(x_btd).reshape(B, T, G, dk)
        v_btgv = dense(G * dv, ("embed", "kv_heads"), "v_proj")(x_btd).reshape(B, T, G, dv)
        cos, sin = rope_cos_sin(cfg, positions_bt)
        q_bthk = jnp.concatenate([q_bthk[..., :dn], apply_rope(q_bthk[..., dn:], cos, sin)], -1)
        k_btgk = jnp.concatenate([k_btgk[..., :dn], apply_rope(k_btgk[..., dn:], cos, sin)], -1)

        new_cache = None
        if cache is not None:
            b = jnp.arange(B)[:, None]
            new_cache = {"k": cache["k"].at[b, positions_bt].set(k_btgk.astype(cache["k"].dtype)),
                         "v": cache["v"].at[b, positions_bt].set(v_btgv.astype(cache["v"].dtype))}
            keys, values = new_cache["k"].astype(k_btgk.dtype), new_cache["v"].astype(v_btgv.dtype)
            k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1])[None], (B, keys.shape[1]))
        else:
            keys, values, k_pos = k_btgk, v_btgv, positions_bt
        S = keys.shape[1]
        dt = dtype_of(cfg.dtype)
        if resolve_attention_impl(cfg, cache is not None) == "cudnn":
            o_bthv = fused_attention(q_bthk, keys, values, positions_bt, softmax_scale(cfg), dt)
            out = dense(cfg.hidden_size, ("o_heads", "embed"), "o_proj")(o_bthv.reshape(B, T, H * dv))
            return out, new_cache
        # Query head h = g * (H / G) + j reads KV head g.
        q_btgjk = q_bthk.reshape(B, T, G, H // G, dk)
        scores = jnp.einsum("btgjk,bsgk->bgjts", q_btgjk, keys, preferred_element_type=jnp.float32)
        scores = scores.reshape(B, H, T, S) * softmax_scale(cfg)
        p_bgjts = _masked_softmax(scores, positions_bt, k_pos).astype(dt).reshape(B, G, H // G, T, S)
        o_btgjv = jnp.einsum("bgjts,bsgv->btgjv", p_bgjts, values)
        out = dense(cfg.hidden_size, ("o_heads", "embed"), "o_proj")(o_btgjv.reshape(B, T, H * dv))
        return out, new_cache


def attention_class(cfg: ModelConfig):
    """The attention module ``cfg.attention`` selects: MLA (default) or GQA (mha / gqa)."""
    return MLA if cfg.attention == "mla" else GQA
