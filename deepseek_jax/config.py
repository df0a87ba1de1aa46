"""Model configuration: one frozen, validated dataclass, presets, and the Hugging Face ``config.json`` bridge.

Every structural choice of the model lives here and nowhere else. A bad value raises ``ValueError`` at
construction, naming the field and the rule it broke, so a typo in an ablation config fails in the first second
and not after an hour of training.

Field names follow the Hugging Face ``DeepseekV3Config`` spelling where one exists (so ``from_hf``/``to_hf`` are
mostly identity maps); the few extra fields (``dtype``, ``moe_dispatch``, ``remat_policy``, ...) are this
project's execution policy and are not written to ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
# gather: decode steps (generate.py)
MOE_DISPATCHES = ("auto", "ragged", "sorted_tiles", "bucket_tiles", "grouped", "dense", "gather")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")  # the naive path's attention core (layers/attention.py)
ATTENTIONS = ("mla", "mha", "gqa")  # mla: DeepSeek's latent attention; mha/gqa: per-head KV (ablation baselines)


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (arXiv 2309.00071), as DeepSeek-V2/V3 and transformers apply it.

    ``attention_factor`` multiplies cos/sin (so the rope part of each score by its square); when left as
    None it is derived exactly as transformers does: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are set, else mscale(factor, 1). The softmax scale is multiplied by mscale(factor,
    mscale_all_dim)^2 when ``mscale_all_dim`` is non-zero.
    """

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = 1.0
    mscale_all_dim: Optional[float] = 1.0
    attention_factor: Optional[float] = None
    truncate: bool = True

    def __post_init__(self):
        for name in ("factor", "beta_fast", "beta_slow"):
            _check(_is_real(getattr(self, name)), f"rope_scaling.{name}",
                   f"must be a finite number, got {getattr(self, name)!r}")
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            v = getattr(self, name)
            _check(v is None or _is_real(v), f"rope_scaling.{name}", f"must be null or a finite number, got {v!r}")
        _check(_is_int(self.original_max_position_embeddings), "rope_scaling.original_max_position_embeddings",
               f"must be an int, got {self.original_max_position_embeddings!r}")
        _check(isinstance(self.truncate, bool), "rope_scaling.truncate", f"must be a bool, got {self.truncate!r}")
        _check(self.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {self.factor}")
        _check(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
               f"must be positive, got {self.original_max_position_embeddings}")
        _check(self.beta_fast > self.beta_slow > 0, "rope_scaling.beta_fast/beta_slow",
               f"need beta_fast > beta_slow > 0, got {self.beta_fast} / {self.beta_slow}")


FP8_FORMATS = ("e4m3", "e5m2")
FP8_BACKENDS = ("xla", "pallas")
FP8_ACCUMS = ("fp32", "limited")
FP8_KERNELS = ("auto", "triton", "mosaic_gpu", "mosaic_tpu", "interpret")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Block-scaled FP8 GEMMs for the MLA projections, the dense/shared/routed expert FFNs (V3 §3.3; docs/fp8.md;
    ops/fp8.py). Never the embedding, output head, router, norms or attention core.

    fmt            GEMM input format: e4m3 (the paper, all three GEMMs) or e5m2
    pow2_scales    round every scale up to a power of two (the paper does so for re-tiled activations)
    backend        xla: dequantize-then-matmul reference (fast on CPU; what training uses there)
                   pallas: the Pallas kernel (ops/fp8_pallas.py; interpret mode on CPU, slow)
    accum          fp32 (exact promotion every 128) | limited (pallas only: ``mantissa_bits``-bit partial sums,
                   promoted every ``promote_every`` elements of K, None = never)
    interpret      Pallas interpret mode; None = on CPU only
    kernel         pallas only: auto (per lowering platform: cuda -> triton, tpu -> mosaic_tpu, cpu -> interpret)
                   | triton | mosaic_gpu (Hopper, accum fp32 only) | mosaic_tpu | interpret (docs/fp8.md "Kernels")
    """

    fmt: str = "e4m3"
    pow2_scales: bool = False
    backend: str = "xla"
    accum: str = "fp32"
    mantissa_bits: int = 14
    promote_every: Optional[int] = 128
    interpret: Optional[bool] = None
    kernel: str = "auto"

    def __post_init__(self):
        _check(self.fmt in FP8_FORMATS, "fp8.fmt", f"must be one of {FP8_FORMATS}, got {self.fmt!r}")
        _check(isinstance(self.pow2_scales, bool), "fp8.pow2_scales", f"must be a bool, got {self.pow2_scales!r}")
        _check(self.backend in FP8_BACKENDS, "fp8.backend", f"must be one of {FP8_BACKENDS}, got {self.backend!r}")
        _check(self.accum in FP8_ACCUMS, "fp8.accum", f"must be one of {FP8_ACCUMS}, got {self.accum!r}")
        _check(self.accum == "fp32" or self.backend == "pallas", "fp8.accum",
               "accum='limited' is emulated by the Pallas kernel only; set backend='pallas'")
        _check(isinstance(self.mantissa_bits, int) and 1 <= self.mantissa_bits <= 24, "fp8.mantissa_bits",
               f"must be an int in [1, 24], got {self.mantissa_bits!r}")
        pe = self.promote_every
        _check(pe is None or (isinstance(pe, int) and pe > 0 and pe % 128 == 0), "fp8.promote_every",
               f"must be None or a positive multiple of 128, got {pe!r}")
        _check(self.accum == "limited" or pe == 128, "fp8.promote_every",
               f"accum='fp32' promotes every 128; got promote_every={pe!r}")
        _check(self.interpret is None or isinstance(self.interpret, bool), "fp8.interpret",
               f"must be None or a bool, got {self.interpret!r}")
        _check(self.kernel in FP8_KERNELS, "fp8.kernel", f"must be one of {FP8_KERNELS}, got {self.kernel!r}")
        _check(self.kernel == "auto" or self.backend == "pallas", "fp8.kernel",
               f"kernel={self.kernel!r} selects a Pallas kernel; set backend='pallas'")
        _check(self.kernel != "mosaic_gpu" or self.accum == "fp32", "fp8.kernel",
               "the mosaic_gpu kernel implements accum='fp32' only; use kernel='triton' for accum='limited'")


def _fp8_from(v):
    """ModelConfig.fp8 from a config file or dict: None/False -> off, True -> defaults, a mapping -> fields."""
    if v is None or v is False:
        return None
    if v is True:
        return Fp8Config()
    if isinstance(v, Fp8Config):
        return v
    if hasattr(v, "items"):  # dict, ml_collections.ConfigDict
        d = dict(v.items())
        unknown = set(d) - {f.name for f in dataclasses.fields(Fp8Config)}
        _check(not unknown, "fp8", f"unknown field(s) {sorted(unknown)}")
        return Fp8Config(**d)
    return v  # rejected by validation


# How this project runs a model, not what the model is: never read from or written to a hub config.json.
POLICY_FIELDS = ("dtype", "param_dtype", "moe_dispatch", "moe_tile_size", "remat_policy", "attn_chunk", "fp8",
                 "attention", "attention_impl", "scan_unroll")


def _check(ok: bool, field: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}: {rule}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A finite int or float (not a bool, not a string such as "1e-6")."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture (V3 §2, §4.2) plus this project's execution policy.

    Defaults are the released DeepSeek-V3 671B model. Use :func:`preset` for named shapes.
    """

    # --- architecture (names as in Hugging Face config.json) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: Optional[int] = 1536  # None: no query compression (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    intermediate_size: int = 18432  # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # width of one routed expert
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 1  # MTP depth D
    rope_theta: float = 10000.0
    rope_scaling: Optional[YarnConfig] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    # --- execution policy (not part of the checkpoint) ---
    dtype: str = "float32"  # compute dtype; params are `param_dtype`; router/softmax/norm/loss are fp32
    param_dtype: str = "float32"
    moe_dispatch: str = "auto"  # auto | ragged | sorted_tiles | bucket_tiles | grouped | dense (ops/moe_dispatch.py)
    moe_tile_size: int = 128  # rows per tile of `sorted_tiles` / `grouped`; bucket_tiles overflow: min(this, 32)
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    # layers per iteration of the scan over identical blocks (lax.scan's unroll; the parameters stay stacked
    # either way). 1: one compiled body, the fastest compile (paper-scale depths); 0: every layer unrolled, no
    # loop: on CPU about 15% faster per train step at the quickstart's 4 layers (no stacked-residual buffers).
    scan_unroll: int = 1
    attn_chunk: int = 0  # MLA's naive attention in query chunks of this many rows, each rematerialised (0: whole)
    # the attention core (layers/attention.py; BUILD.md "Attention kernels"): xla (einsums, [B,H,T,S] scores) |
    # chunked (xla in attn_chunk-row query chunks) | cudnn (cuDNN fused attention, bf16/fp16) | auto (cudnn on a
    # GPU where the shapes allow, else chunked if attn_chunk > 0, else xla)
    attention_impl: str = "auto"

    # --- attention ablation (experiments/configs/attention.py); not part of a DeepSeek checkpoint ---
    attention: str = "mla"  # mla (DeepSeek-V2/V3) | mha | gqa  (layers/attention.py: MLA or GQA)
    num_key_value_heads: Optional[int] = None  # gqa: KV heads (divides num_attention_heads); mha: None or H

    # --- FP8 training (ops/fp8.py); None = off; not part of the checkpoint ---
    fp8: Optional[Fp8Config] = None

    def __post_init__(self):
        pos = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
               "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
               "max_position_embeddings", "moe_tile_size")
        for name in pos:
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                   f"must be a positive int, got {v!r}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name,
                   f"must be a non-negative int, got {v!r}")
        if self.q_lora_rank is not None:
            _check(isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0, "q_lora_rank",
                   f"must be None or a positive int, got {self.q_lora_rank!r}")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
               f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        _check(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
               f"must be <= num_hidden_layers={self.num_hidden_layers}, got {self.first_k_dense_replace}")
        _check(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
               f"must be divisible by n_group={self.n_group}, got {self.n_routed_experts}")
        _check(self.topk_group <= self.n_group, "topk_group",
               f"must be <= n_group={self.n_group}, got {self.topk_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        _check(self.num_experts_per_tok <= kept, "num_experts_per_tok",
               f"must be <= the experts in the kept groups (topk_group * n_routed_experts / n_group = {kept}), "
               f"got {self.num_experts_per_tok}")
        if self.topk_method == "noaux_tc" and self.n_group > 1:
            _check(self.n_routed_experts // self.n_group >= 2, "n_group",
                   "noaux_tc scores a group by the sum of its top-2 experts, so each group needs >= 2 experts")
        _check(self.scoring_func in SCORING_FUNCS, "scoring_func",
               f"must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        _check(self.topk_method in TOPK_METHODS, "topk_method",
               f"must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        _check(self.moe_dispatch in MOE_DISPATCHES, "moe_dispatch",
               f"must be one of {MOE_DISPATCHES}, got {self.moe_dispatch!r}")
        _check(self.remat_policy in REMAT_POLICIES, "remat_policy",
               f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        _check(isinstance(self.scan_unroll, int) and not isinstance(self.scan_unroll, bool) and self.scan_unroll >= 0,
               "scan_unroll", f"must be an int >= 0 (0: unroll every layer), got {self.scan_unroll!r}")
        _check(isinstance(self.attn_chunk, int) and not isinstance(self.attn_chunk, bool) and self.attn_chunk >= 0,
               "attn_chunk", f"must be an int >= 0 (0: no chunking), got {self.attn_chunk!r}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "chunked":
            _check(self.attn_chunk > 0, "attn_chunk",
                   "attention_impl='chunked' needs attn_chunk > 0 (the query rows per chunk)")
        elif self.attention_impl in ("xla", "cudnn"):
            _check(self.attn_chunk == 0, "attn_chunk",
                   f"is the chunk size of attention_impl='chunked' (or 'auto'); got attn_chunk={self.attn_chunk} "
                   f"with attention_impl={self.attention_impl!r}")
        if self.attention_impl == "cudnn":
            _check(self.dtype in ("bfloat16", "float16"), "attention_impl",
                   f"'cudnn' (cuDNN fused attention) needs dtype bfloat16 or float16, got dtype={self.dtype!r}")
            _check(self.qk_head_dim <= 256 and self.qk_head_dim % 8 == 0, "attention_impl",
                   f"'cudnn' needs qk_nope_head_dim + qk_rope_head_dim <= 256 and a multiple of 8, got "
                   f"{self.qk_head_dim}")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        _check(self.attention in ATTENTIONS, "attention", f"must be one of {ATTENTIONS}, got {self.attention!r}")
        _check(self.fp8 is None or isinstance(self.fp8, Fp8Config), "fp8",
               f"must be None or an Fp8Config (or a dict of its fields via replace/preset), got {self.fp8!r}")
        kvh = self.num_key_value_heads
        if self.attention == "mla":
            _check(kvh is None, "num_key_value_heads",
                   f"must be None with attention='mla' (MLA has no per-head KV), got {kvh!r}")
        elif self.attention == "mha":
            _check(kvh is None or kvh == self.num_attention_heads, "num_key_value_heads",
                   f"must be None or num_attention_heads={self.num_attention_heads} with attention='mha', "
                   f"got {kvh!r}")
        else:
            _check(isinstance(kvh, int) and not isinstance(kvh, bool) and kvh > 0
                   and self.num_attention_heads % kvh == 0, "num_key_value_heads",
                   f"attention='gqa' needs a positive int dividing num_attention_heads="
                   f"{self.num_attention_heads}, got {kvh!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor"):
            _check(_is_real(getattr(self, name)), name, f"must be a finite number, got {getattr(self, name)!r}")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            _check(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _check(self.initializer_range > 0, "initializer_range", f"must be positive, got {self.initializer_range}")
        _check(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
               "routed_scaling_factor", f"must be a positive finite number, got {self.routed_scaling_factor}")
        _check(not self.tie_word_embeddings, "tie_word_embeddings",
               "DeepSeek-V3 unties embedding and output head; tied embeddings are not supported")
        if self.rope_scaling is not None:
            _check(isinstance(self.rope_scaling, YarnConfig), "rope_scaling",
                   f"must be a YarnConfig or None, got {type(self.rope_scaling).__name__}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None:
                _check(_is_int(v) and 0 <= v < self.vocab_size, name,
                       f"must be null or an int in [0, vocab_size={self.vocab_size}), got {v!r}")

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF rule: layer i is MoE iff i >= first_k_dense_replace (MTP layers are numbered L, L+1, ...)."""
        return layer_idx >= self.first_k_dense_replace

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the MHA/GQA variant (num_attention_heads for mha)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def kv_cache_elements_per_token_per_layer(self) -> int:
        """MLA caches the normalized latent and the shared rope key: kv_lora_rank + qk_rope_head_dim.
        MHA/GQA cache a key (qk_nope + qk_rope dims) and a value (v_head_dim) per KV head."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.kv_heads * (self.qk_head_dim + self.v_head_dim)

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """KV-cache bytes one token occupies over all main-model layers (MTP modules are not cached)."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
        if dtype not in itemsize:
            raise ValueError(f"kv_cache_bytes_per_token: dtype must be one of {tuple(itemsize)}, got {dtype!r}")
        return self.kv_cache_elements_per_token_per_layer * self.num_hidden_layers * itemsize[dtype]

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with some fields changed (``rope_scaling`` may be given as a dict)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        if isinstance(changes.get("rope_scaling"), Mapping):
            changes["rope_scaling"] = YarnConfig(**changes["rope_scaling"])
        if "fp8" in changes:
            changes["fp8"] = _fp8_from(changes["fp8"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        if isinstance(d.get("rope_scaling"), Mapping):
            d["rope_scaling"] = YarnConfig(**d["rope_scaling"])
        if "fp8" in d:
            d["fp8"] = _fp8_from(d["fp8"])
        return cls(**d)

    # ----- Hugging Face config.json -----
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from a hub ``config.json`` dict. Accepts both spellings of the rope settings:
        the hub's ``rope_theta`` + ``rope_scaling`` and newer transformers' ``rope_parameters`` (which also
        writes ``head_dim`` = qk_rope_head_dim; that key is ignored)."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"config.json: a JSON object expected, got {type(hf).__name__}")
        hf = dict(hf)
        mt = hf.get("model_type")
        if mt is not None and mt not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ValueError(f"config.json: model_type {mt!r} is not a DeepSeek-V2/V3 model")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act must be 'silu' (SwiGLU), got {act!r}")
        if hf.get("attention_bias"):
            raise ValueError("config.json: attention_bias=true is not supported (DeepSeek-V3 has none)")
        if hf.get("rope_interleave") is False:
            raise ValueError("config.json: rope_interleave=false is not supported; the released weights "
                             "rotate adjacent pairs")
        rope = hf.get("rope_parameters")
        theta = hf.get("rope_theta")
        scaling = hf.get("rope_scaling")
        for key, v in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if v is not None and not isinstance(v, Mapping):
                raise ValueError(f"config.json: {key} must be an object or null, got {type(v).__name__} {v!r:.40}")
        if rope is not None:
            theta = rope.get("rope_theta", theta)
            scaling = rope
        if theta is not None and not _is_real(theta):
            raise ValueError(f"config.json: rope_theta must be a number, got {theta!r:.40}")
        yarn = None
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype == "yarn":
                kw = {}
                for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "attention_factor", "truncate"):
                    if scaling.get(k) is not None:
                        kw[k] = scaling[k]
                # Missing mscale keys mean "not set" in transformers (not 1.0).
                kw.setdefault("mscale", None)
                kw.setdefault("mscale_all_dim", None)
                if "original_max_position_embeddings" not in kw:
                    kw["original_max_position_embeddings"] = hf.get("max_position_embeddings", 4096)
                yarn = YarnConfig(**kw)
            elif rtype != "default":
                raise ValueError(f"config.json: rope type {rtype!r} is not supported (default or yarn)")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Execution-policy fields are never read from config.json: newer transformers write "dtype" (the storage
        # dtype of the weights), which must not become this project's compute dtype.
        policy = POLICY_FIELDS + ("num_key_value_heads",)  # hub configs say num_key_value_heads = H; MLA ignores it
        kw = {k: v for k, v in hf.items() if k in fields and k not in ("rope_scaling", "rope_theta") + policy}
        if "n_routed_experts" not in hf and "num_local_experts" in hf:
            kw["n_routed_experts"] = hf["num_local_experts"]
        if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:
            kw["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if hf.get("n_routed_experts") is None and "n_routed_experts" in kw:
            raise ValueError("config.json: n_routed_experts is null (dense DeepSeek models are not supported)")
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        if kw.get("num_nextn_predict_layers") is None:
            kw["num_nextn_predict_layers"] = 0
        if "initializer_range" not in hf:
            kw.pop("initializer_range", None)
        if isinstance(kw.get("eos_token_id"), list):
            eos = kw["eos_token_id"]
            if not eos or not all(_is_int(e) for e in eos):
                raise ValueError(f"config.json: eos_token_id must be an int or a non-empty list of ints, got "
                                 f"{eos!r:.40}")
            kw["eos_token_id"] = eos[0]
        kw["rope_theta"] = float(theta) if theta is not None else 10000.0
        kw["rope_scaling"] = yarn
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The hub ``config.json`` spelling (``rope_theta`` + ``rope_scaling``), loadable by transformers'
        DeepseekV3ForCausalLM."""
        if self.attention != "mla":
            raise ValueError(f"ModelConfig.attention: to_hf writes DeepSeek-V3 (MLA) configs only, got "
                             f"attention={self.attention!r}")
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in POLICY_FIELDS + ("rope_scaling", "num_key_value_heads")}
        hf = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_act": "silu",
              "attention_bias": False, "attention_dropout": 0.0, "rope_interleave": True,
              "num_key_value_heads": self.num_attention_heads, "torch_dtype": self.param_dtype, **arch}
        if self.rope_scaling is not None:
            y = self.rope_scaling
            rs = {"type": "yarn", "rope_type": "yarn", "factor": y.factor,
                  "original_max_position_embeddings": y.original_max_position_embeddings,
                  "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate}
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(y, k) is not None:
                    rs[k] = getattr(y, k)
            hf["rope_scaling"] = rs
        else:
            hf["rope_scaling"] = None
        return hf


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------
_V3_YARN = YarnConfig(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0)


def _v3_671b() -> ModelConfig:
    return ModelConfig(rope_scaling=_V3_YARN)


def _v2_lite() -> ModelConfig:
    # DeepSeek-V2-Lite's shape (15.7B total / 2.4B activated) with V3's sigmoid router and aux-free bias.
    # V2-Lite has n_group = topk_group = 1, routed_scaling_factor 1.0 and no MTP.
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=10944,
        moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_scaling=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                                                                mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=100000, eos_token_id=100001)


def _v2_236b() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, n_group=8, topk_group=3, routed_scaling_factor=16.0, first_k_dense_replace=1,
        num_nextn_predict_layers=0, rope_scaling=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                                                           mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=100000, eos_token_id=100001)


def _ablation_small_moe() -> ModelConfig:
    # V3 §4.5: "small" MoE ablation baseline, 15.7B total / 2.4B activated, 27 layers (V2-Lite shape).
    return _v2_lite().replace(num_nextn_predict_layers=0)


def _tiny() -> ModelConfig:
    """Smallest model with the full V3 topology: q compression, group-limited routing, shared expert,
    a dense-first layer, MTP depth 1 and YaRN. For tests and CPU demos."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=160,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=1024, rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=256),
        bos_token_id=0, eos_token_id=1)


def _tiny_v2_lite() -> ModelConfig:
    """Tiny V2-Lite topology: no q compression, single group, two shared experts, no MTP."""
    return _tiny().replace(q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2,
                           num_experts_per_tok=3, routed_scaling_factor=1.0, num_nextn_predict_layers=0)


def _small() -> ModelConfig:
    """~20M-parameter V3-shaped model, small enough to train on a laptop CPU in minutes."""
    return ModelConfig(
        vocab_size=256 + 3, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=704,
        moe_intermediate_size=128, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=4096, rope_scaling=None, bos_token_id=256, eos_token_id=257, scan_unroll=0)


_PRESETS = {
    "deepseek-v3-671b": _v3_671b,
    "deepseek-v2-236b": _v2_236b,
    "deepseek-v2-lite": _v2_lite,
    "ablation-small-moe-15.7b": _ablation_small_moe,
    "tiny": _tiny,
    "tiny-v2-lite": _tiny_v2_lite,
    "small": _small,
}


def preset_names() -> list:
    return sorted(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, optionally with fields replaced: ``preset("tiny", dtype="bfloat16")``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {preset_names()}")
    cfg = _PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
