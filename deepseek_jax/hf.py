"""Hugging Face checkpoint import/export: ``config.json`` + ``*.safetensors`` (sharded, FP8 block-scaled, MTP).

    cfg, variables = hf.load_pretrained("path/to/DeepSeek-V3")        # {"params": ..., "router": ...}
    hf.save_pretrained(cfg, variables, "out/", max_shard_bytes=5 << 30)  # loads in transformers.DeepseekV3ForCausalLM

The name mapping lives in ONE place, :func:`tensor_map`, used by both directions so they cannot drift: for a config
it yields every hub tensor name with the leaf it lives in (collection + path), the leading indices into that leaf
(layer within an ``nn.scan`` stack, expert within the stacked expert weights) and whether it is transposed (HF
linear weights are [out, in], our kernels [in, out]).

Hub layout (docs/checkpoint_format.md): HF layer i < first_k_dense_replace lives in ``dense_layers[i]``, the others in
``moe_layers[i - first_k_dense_replace]``; MTP module j is HF layer ``num_hidden_layers + j`` with enorm, hnorm,
eh_proj, shared_head.norm and the block; it also carries copies of ``embed_tokens`` and ``shared_head.head``.
This model shares the embedding and output head between the main model and MTP (V3 §2.2), so those copies are
written on save (as the hub does), and on load they are optional: when present they are compared with the main
tensors and a difference is reported with a warning (the main copy is used).

Loading streams tensor by tensor: every destination leaf is preallocated once as a numpy array in the target dtype,
each checkpoint tensor (a read-only view into a memory-mapped file) is copied/transposed/dequantized straight into
its slot, and at the end the leaves are handed to JAX one at a time, dropping each numpy buffer. Before any data is
read, the whole checkpoint is checked against the expected names, shapes and dtypes: a missing, unexpected or
mis-shaped tensor, or an FP8 weight without its ``weight_scale_inv``, raises ``ValueError`` naming the tensor and
the file (for a missing one: the directory/index it was looked up in).

FP8 checkpoints (``quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128]}``): a float8 weight
W [out, in] comes with ``<prefix>.weight_scale_inv`` [ceil(out/128), ceil(in/128)] (fp32) and the real weight is
W * scale_inv broadcast over each 128x128 block (edge blocks partial). It is dequantized on load, in row-block
chunks, straight into the destination.

transformers compatibility (checked against 5.23): ``save_pretrained`` writes per-expert tensors
(``mlp.experts.{e}.{gate,up,down}_proj.weight``), which transformers fuses into its 3-D expert layout at load time;
it ignores the MTP layer (reported as unexpected keys, not an error). transformers' own ``save_pretrained`` writes
per-expert names too but drops the MTP layer while keeping ``num_nextn_predict_layers`` in config.json: load such
checkpoints with ``load_mtp=False``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_jax import model as model_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.safetensors_io import SafeTensorsFile, check_regular_file, read_json_file, write_file

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
SCALE_SUFFIX = "_scale_inv"  # "<prefix>.weight" -> "<prefix>.weight_scale_inv"

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


# ---------------------------------------------------------------------------------------------------------------
# The name mapping (the only place HF names appear)
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One hub tensor <-> one slot of one of our leaves: ``variables[collection][path...][index]``, transposed
    when ``transpose`` (HF linear [out, in] vs our kernel [in, out]). ``shared_with`` names the main tensor this one
    is a copy of (the MTP layer's embed_tokens / shared_head.head): written on save, checked on load."""

    hf_name: str
    collection: str  # "params" | "router"
    path: Tuple[str, ...]
    index: Tuple[int, ...] = ()
    transpose: bool = False
    shared_with: Optional[str] = None

    def hf_shape(self, leaf_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        slot = tuple(leaf_shape[len(self.index):])
        return slot[::-1] if self.transpose else slot

    @property
    def leaf_name(self) -> str:
        return "/".join((self.collection,) + self.path)


def _block_map(cfg: ModelConfig, prefix: str, path: Tuple[str, ...], index: Tuple[int, ...], moe: bool,
               router_path: Tuple[str, ...]) -> Iterator[TensorMap]:
    """One decoder block: HF ``{prefix}*`` <-> our Block params under ``path`` (at ``index`` of a stack)."""

    def lin(hf, ours, idx=index):
        return TensorMap(f"{prefix}{hf}.weight", "params", path + ours + ("kernel",), idx, True)

    def norm(hf, ours):
        return TensorMap(f"{prefix}{hf}.weight", "params", path + ours + ("scale",), index)

    yield norm("input_layernorm", ("attn_norm",))
    yield norm("post_attention_layernorm", ("mlp_norm",))
    if cfg.q_lora_rank is None:
        yield lin("self_attn.q_proj", ("attn", "q_proj"))
    else:
        yield lin("self_attn.q_a_proj", ("attn", "q_a_proj"))
        yield norm("self_attn.q_a_layernorm", ("attn", "q_a_norm"))
        yield lin("self_attn.q_b_proj", ("attn", "q_b_proj"))
    yield lin("self_attn.kv_a_proj_with_mqa", ("attn", "kv_a_proj"))
    yield norm("self_attn.kv_a_layernorm", ("attn", "kv_a_norm"))
    yield lin("self_attn.kv_b_proj", ("attn", "kv_b_proj"))
    yield lin("self_attn.o_proj", ("attn", "o_proj"))
    if not moe:
        for p in ("gate_proj", "up_proj", "down_proj"):
            yield lin(f"mlp.{p}", ("mlp", p))
        return
    yield TensorMap(f"{prefix}mlp.gate.weight", "params", path + ("mlp", "router", "kernel"), index, True)
    yield TensorMap(f"{prefix}mlp.gate.e_score_correction_bias", "router", router_path + ("mlp", "router", "bias"),
                    index)
    for e in range(cfg.n_routed_experts):
        for p in ("gate", "up", "down"):
            yield TensorMap(f"{prefix}mlp.experts.{e}.{p}_proj.weight", "params", path + ("mlp", f"experts_{p}"),
                            index + (e,), True)
    if cfg.n_shared_experts > 0:
        for p in ("gate_proj", "up_proj", "down_proj"):
            yield lin(f"mlp.shared_experts.{p}", ("mlp", "shared_experts", p))


def tensor_map(cfg: ModelConfig) -> Iterator[TensorMap]:
    """Every hub tensor of a checkpoint for ``cfg`` (MTP layers included when num_nextn_predict_layers > 0), in
    hub order (embedding, layers 0..L-1, MTP layers, final norm, head)."""
    yield TensorMap("model.embed_tokens.weight", "params", ("embed", "embedding"))
    k, L = cfg.first_k_dense_replace, cfg.num_hidden_layers
    for i in range(L):
        stack = "dense_layers" if i < k else "moe_layers"
        li = i if i < k else i - k
        yield from _block_map(cfg, f"model.layers.{i}.", (stack,), (li,), cfg.is_moe_layer(i), (stack,))
    for j in range(cfg.num_nextn_predict_layers):
        pre, mtp = f"model.layers.{L + j}.", f"mtp_{j}"
        yield TensorMap(f"{pre}embed_tokens.weight", "params", ("embed", "embedding"),
                        shared_with="model.embed_tokens.weight")
        yield TensorMap(f"{pre}enorm.weight", "params", (mtp, "enorm", "scale"))
        yield TensorMap(f"{pre}hnorm.weight", "params", (mtp, "hnorm", "scale"))
        yield TensorMap(f"{pre}eh_proj.weight", "params", (mtp, "eh_proj", "kernel"), (), True)
        yield from _block_map(cfg, pre, (mtp, "block"), (), cfg.is_moe_layer(L + j), (mtp, "block"))
        yield TensorMap(f"{pre}shared_head.norm.weight", "params", (mtp, "head_norm", "scale"))
        yield TensorMap(f"{pre}shared_head.head.weight", "params", ("lm_head", "kernel"), (), True,
                        shared_with="lm_head.weight")
    yield TensorMap("model.norm.weight", "params", ("final_norm", "scale"))
    yield TensorMap("lm_head.weight", "params", ("lm_head", "kernel"), (), True)


def leaf_shapes(cfg: ModelConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{(collection, *path): shape} of every variable, from eval_shape of the model's own init (nothing
    allocated), so the mapping is always checked against the real parameter tree."""
    # Shapes do not depend on the execution policy: normalise it so the (cached) trace is shared.
    return dict(_leaf_shapes(cfg.replace(dtype="float32", param_dtype="float32", moe_dispatch="dense",
                                         remat_policy="none")))


@functools.lru_cache(maxsize=32)
def _leaf_shapes(cfg: ModelConfig):
    abstract = model_lib.abstract_variables(cfg)  # tracing init takes ~1 s even for tiny configs: cached
    return tuple((tuple(k.key for k in kp), tuple(leaf.shape))
                 for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0])


def _layer_of(name: str) -> Optional[int]:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
class _Checkpoint:
    """The tensors of a HF directory: name -> open (lazy, memory-mapped) file, from the index or the single file."""

    def __init__(self, path: str):
        self.dir = path
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        self.files: Dict[str, SafeTensorsFile] = {}
        self.where: Dict[str, str] = {}
        try:
            if os.path.exists(index):
                self.source = index
                weight_map = _weight_map(index)
                for fname in sorted(set(weight_map.values())):
                    fpath = os.path.join(path, fname)
                    if not os.path.exists(fpath):
                        raise ValueError(f"{index}: refers to shard {fname!r}, which does not exist in {path}")
                    check_regular_file(fpath, f"shard {fname!r} named by {INDEX_FILE}")
                    self._add(fpath)
                for name, fname in weight_map.items():
                    got = self.where.get(name)
                    if got is None or os.path.basename(got) != fname:
                        raise ValueError(f"{index}: tensor {name!r} is mapped to {fname!r} but that file does not "
                                         f"contain it" + (f" (it is in {got})" if got else ""))
            elif os.path.exists(single):
                self.source = single
                self._add(single)
            else:
                raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")
        except BaseException:
            self.close()
            raise

    def _add(self, fpath):
        f = SafeTensorsFile(fpath)
        self.files[fpath] = f
        for name in f.keys():
            if name in self.where:
                raise ValueError(f"tensor {name!r} is stored twice: in {self.where[name]} and in {fpath}")
            self.where[name] = fpath

    def file(self, name) -> SafeTensorsFile:
        return self.files[self.where[name]]

    def close(self):
        for f in self.files.values():
            f.close()


def _plain_file_name(name: str) -> bool:
    """A file name inside the checkpoint directory: no directory part, not absolute, not '.' or '..'."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and not os.path.isabs(name))


def _weight_map(index: str) -> Dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, every structural type checked: tensor name -> a plain
    file name in the same directory (an entry such as "/etc/passwd" or "../x.safetensors" is refused before
    anything is opened)."""
    doc = read_json_file(index, "safetensors index")
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise ValueError(f"{index}: not a safetensors index (need a JSON object with a 'weight_map' object)")
    weight_map = doc["weight_map"]
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise ValueError(f"{index}: weight_map[{name[:80]!r}] must be a file name (a string)")
        if not _plain_file_name(fname):
            raise ValueError(f"{index}: weight_map[{name[:80]!r}] = {fname[:80]!r} is not a plain file name in the "
                             "checkpoint directory (no directories, no '..', not absolute)")
    return weight_map


def check_scales(s: np.ndarray, name: str, where: str) -> None:
    """FP8 block scales must be finite positive floats (NaN, inf, 0, negative, int or bool scales refused)."""
    if not np.issubdtype(s.dtype, np.floating) and s.dtype != np.dtype(ml_dtypes.bfloat16):
        raise ValueError(f"tensor {name!r} in {where}: FP8 scales must be floating-point, got dtype {s.dtype}")
    if _is_fp8(s.dtype):
        raise ValueError(f"tensor {name!r} in {where}: FP8 scales must be fp32/bf16/fp16, got dtype {s.dtype}")
    f = np.asarray(s, np.float32)
    bad = ~(np.isfinite(f) & (f > 0))
    if bad.any():
        raise ValueError(f"tensor {name!r} in {where}: {int(bad.sum())} of {f.size} FP8 scales are not finite "
                         "positive numbers")


def _is_fp8(dt: np.dtype) -> bool:
    return dt in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def _dequantize_into(slot: np.ndarray, w: np.ndarray, s: np.ndarray, block: Tuple[int, int], transpose: bool):
    """slot[...] = (w * s broadcast over block x block tiles), transposed if asked. w: [out, in] float8,
    s: [ceil(out/bo), ceil(in/bi)]. Processed in chunks of whole row-blocks to bound temporary memory."""
    out_dim, in_dim = w.shape
    bo, bi = block
    s = np.asarray(s, np.float32)
    rows_per_chunk = max(bo, (1 << 22) // max(in_dim, 1) // bo * bo)
    for r0 in range(0, out_dim, rows_per_chunk):
        r1 = min(out_dim, r0 + rows_per_chunk)
        scale = np.repeat(np.repeat(s[r0 // bo:-(-r1 // bo)], bo, axis=0), bi, axis=1)[:r1 - r0, :in_dim]
        chunk = w[r0:r1].astype(np.float32) * scale
        if transpose:
            slot[:, r0:r1] = chunk.T
        else:
            slot[r0:r1] = chunk


def load_pretrained(path, dtype: str = "float32", load_mtp: bool = True, **config_overrides):
    """Load a Hugging Face DeepSeek-V3 directory (config.json + model.safetensors or a sharded index; bf16/fp32 or
    FP8 block-quantized) as ``(cfg, variables)``.

    dtype: dtype of the loaded parameters and the compute dtype of the returned config (``cfg.dtype`` and
      ``cfg.param_dtype``; pass ``param_dtype=...`` to store them differently). The router bias is always fp32.
    load_mtp: when False, the config's MTP depth is set to 0 and the checkpoint's MTP layers (HF layers >=
      num_hidden_layers) are ignored; needed for checkpoints written by transformers, which drops them.
    config_overrides: ModelConfig fields to replace (execution policy such as moe_dispatch, remat_policy).
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path}: no {CONFIG_NAME}")
    hf_cfg = read_json_file(cfg_path, CONFIG_NAME)
    if not isinstance(hf_cfg, dict):
        raise ValueError(f"{cfg_path}: a JSON object expected")
    overrides = {"dtype": dtype, "param_dtype": dtype, **config_overrides}
    if not load_mtp:
        overrides["num_nextn_predict_layers"] = 0
    try:
        cfg = ModelConfig.from_hf(hf_cfg, **overrides)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    block = _fp8_block(hf_cfg, cfg_path)

    ckpt = _Checkpoint(path)
    try:
        variables = _load(cfg, ckpt, block, load_mtp)
    finally:
        ckpt.close()
    return cfg, variables


def _fp8_block(hf_cfg: Mapping[str, Any], cfg_path: str) -> Tuple[int, int]:
    qc = hf_cfg.get("quantization_config")
    if not qc:
        return (128, 128)
    if not isinstance(qc, dict):
        raise ValueError(f"{cfg_path}: quantization_config must be an object")
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"{cfg_path}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
                         "supported (only 'fp8' block quantization)")
    block = qc.get("weight_block_size") or [128, 128]
    if not isinstance(block, list) or len(block) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise ValueError(f"{cfg_path}: quantization_config.weight_block_size must be two positive ints, got {block}")
    return tuple(block)


def _load(cfg: ModelConfig, ckpt: _Checkpoint, block: Tuple[int, int], load_mtp: bool):
    shapes = leaf_shapes(cfg)
    entries = list(tensor_map(cfg))
    pdt = _NP_DTYPES[cfg.param_dtype]

    # ---- 1. check the whole checkpoint against the expected names, shapes and dtypes (no data read) ----
    consumed = set()
    plan = []  # (entry, scale_name or None)
    for m in entries:
        key = (m.collection,) + m.path
        if key not in shapes:  # a mapping bug, not a checkpoint problem
            raise AssertionError(f"hf.tensor_map: {m.hf_name} maps to unknown leaf {m.leaf_name}")
        if m.hf_name not in ckpt.where:
            if m.shared_with is not None:
                continue  # optional copy of a shared tensor
            hint, layer = "", _layer_of(m.hf_name)
            if layer is not None and layer >= cfg.num_hidden_layers:
                hint = (f" (config.json says num_nextn_predict_layers={cfg.num_nextn_predict_layers}; pass "
                        "load_mtp=False to load a checkpoint without its MTP layers)")
            raise ValueError(f"missing tensor {m.hf_name!r}: not found in {ckpt.source}{hint}")
        f = ckpt.file(m.hf_name)
        want = m.hf_shape(shapes[key])
        got, dt = f.shape(m.hf_name), f.dtype(m.hf_name)
        if got != want:
            raise ValueError(f"tensor {m.hf_name!r} in {f.path} has shape {list(got)}, expected {list(want)} "
                             f"(for {m.leaf_name})")
        if not (np.issubdtype(dt, np.floating) or _is_fp8(dt) or dt == np.dtype(ml_dtypes.bfloat16)):
            raise ValueError(f"tensor {m.hf_name!r} in {f.path} has dtype {dt}, expected a floating-point dtype")
        consumed.add(m.hf_name)
        scale_name = None
        if _is_fp8(dt):
            scale_name = m.hf_name + SCALE_SUFFIX
            if len(got) != 2:
                raise ValueError(f"tensor {m.hf_name!r} in {f.path} is float8 but not 2-D {list(got)}; only linear "
                                 "weights can be block-quantized")
            if scale_name not in ckpt.where:
                raise ValueError(f"tensor {m.hf_name!r} in {f.path} is {dt} but its scale {scale_name!r} is missing "
                                 f"from {ckpt.source}")
            sf = ckpt.file(scale_name)
            sdt = sf.dtype(scale_name)
            if not (np.issubdtype(sdt, np.floating) or sdt == np.dtype(ml_dtypes.bfloat16)) or _is_fp8(sdt):
                raise ValueError(f"tensor {scale_name!r} in {sf.path}: FP8 scales must be fp32/bf16/fp16, got "
                                 f"dtype {sdt}")
            want_s = tuple(-(-n // b) for n, b in zip(got, block))
            if sf.shape(scale_name) != want_s:
                raise ValueError(f"tensor {scale_name!r} in {sf.path} has shape {list(sf.shape(scale_name))}, "
                                 f"expected {list(want_s)} (blocks of {list(block)} over {list(got)})")
            consumed.add(scale_name)
        plan.append((m, scale_name))
    unexpected = []
    for name, fpath in ckpt.where.items():
        if name in consumed or _IGNORED_RE.search(name):
            continue
        layer = _layer_of(name)
        if not load_mtp and layer is not None and layer >= cfg.num_hidden_layers:
            continue
        unexpected.append((name, fpath))
    if unexpected:
        name, fpath = sorted(unexpected)[0]
        more = f" (and {len(unexpected) - 1} more, e.g. {[n for n, _ in sorted(unexpected)[1:4]]})" \
            if len(unexpected) > 1 else ""
        raise ValueError(f"unexpected tensor {name!r} in {fpath}{more}: no parameter of this config "
                         f"corresponds to it")

    # ---- 2. preallocate every leaf, fill tensor by tensor ----
    dest: Dict[Tuple[str, ...], np.ndarray] = {
        key: np.empty(shape, np.float32 if key[0] == "router" else pdt) for key, shape in shapes.items()}
    filled = {key: 0 for key in dest}

    def read_into(slot, m, scale_name):
        f = ckpt.file(m.hf_name)
        w = f.get(m.hf_name)
        if scale_name is not None:
            s = ckpt.file(scale_name).get(scale_name)
            check_scales(s, scale_name, ckpt.file(scale_name).path)
            _dequantize_into(slot, w, s, block, m.transpose)
        else:
            slot[...] = w.T if m.transpose else w
        del w

    shared = []
    for m, scale_name in plan:
        if m.shared_with is not None:
            shared.append((m, scale_name))
            continue
        key = (m.collection,) + m.path
        slot = dest[key][m.index] if m.index else dest[key]
        read_into(slot, m, scale_name)
        filled[key] += slot.size
    not_filled = [k for k, n in filled.items() if n != dest[k].size]
    if not_filled:  # a mapping bug: tensor_map does not cover every parameter exactly once
        raise AssertionError(f"hf.tensor_map leaves some parameters unset: {['/'.join(k) for k in not_filled]}")
    for m, scale_name in shared:
        key = (m.collection,) + m.path
        copy = np.empty_like(dest[key])
        read_into(copy, m, scale_name)
        if not np.array_equal(copy, dest[key]):
            diff = float(np.max(np.abs(copy.astype(np.float32) - dest[key].astype(np.float32))))
            warnings.warn(f"{m.hf_name!r} in {ckpt.file(m.hf_name).path} differs from {m.shared_with!r} (max abs "
                          f"diff {diff:.3g}); this model shares them between the main model and MTP, so the main "
                          "copy is used", stacklevel=3)
        del copy

    # ---- 3. hand leaves to JAX one at a time, dropping each numpy buffer ----
    variables: Dict[str, Any] = {}
    for key in list(dest):
        arr = dest.pop(key)
        node = variables
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jnp.asarray(arr)
        del arr
    return variables


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------
def _get_leaf(variables, key):
    node = variables
    for k in key:
        node = node[k]
    return node


def save_pretrained(cfg: ModelConfig, variables, path, dtype: str = "float32",
                    max_shard_bytes: Optional[int] = None) -> List[str]:
    """Write ``variables`` as a Hugging Face directory: config.json (``cfg.to_hf()``) and safetensors in the hub
    layout (per-expert tensors, MTP layers as ``model.layers.{L+j}`` with copies of embed_tokens and
    shared_head.head). ``dtype``: storage dtype of the weights (the router bias stays fp32). With
    ``max_shard_bytes``, tensors are packed in order into ``model-0000i-of-0000n.safetensors`` files of at most that
    size (a single larger tensor gets a file of its own) plus ``model.safetensors.index.json``. Stale model files of
    an earlier save in ``path`` are removed. Returns the written file names."""
    if dtype not in _NP_DTYPES:
        raise ValueError(f"save_pretrained: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    path = os.fspath(path)
    variables = nn.meta.unbox(variables)
    shapes = leaf_shapes(cfg)
    for key, shape in shapes.items():
        try:
            leaf = _get_leaf(variables, key)
        except (KeyError, TypeError):
            raise ValueError(f"save_pretrained: variables lack {'/'.join(key)} (expected shape {list(shape)})") \
                from None
        if tuple(leaf.shape) != shape:
            raise ValueError(f"save_pretrained: {'/'.join(key)} has shape {list(leaf.shape)}, expected {list(shape)} "
                             "for this config")
    for kp, _ in jax.tree_util.tree_flatten_with_path({c: variables.get(c, {}) for c in ("params", "router")})[0]:
        key = tuple(getattr(k, "key", k) for k in kp)
        if key not in shapes:
            raise ValueError(f"save_pretrained: variables have {'/'.join(map(str, key))}, which this config does not "
                             "(wrong config for these variables?)")
    sdt = _NP_DTYPES[dtype]
    entries = list(tensor_map(cfg))
    specs, by_name = [], {}
    for m in entries:
        key = (m.collection,) + m.path
        tdt = np.dtype(np.float32) if m.collection == "router" else sdt
        specs.append((m.hf_name, tdt, m.hf_shape(shapes[key])))
        by_name[m.hf_name] = (m, tdt)

    def fetch(name):
        m, tdt = by_name[name]
        leaf = _get_leaf(variables, (m.collection,) + m.path)
        x = np.asarray(leaf[m.index] if m.index else leaf)  # slice on device first, then copy to host
        if m.transpose:
            x = x.T
        return np.ascontiguousarray(x.astype(tdt, copy=False))

    # Split into shards, in hub order.
    shards: List[List[Tuple[str, Any, Tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    os.makedirs(path, exist_ok=True)
    for fname in os.listdir(path):
        if fname in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(fname):
            os.remove(os.path.join(path, fname))
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = dtype
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    if len(shards) == 1:
        write_file(os.path.join(path, SINGLE_FILE), shards[0], fetch)
        return [CONFIG_NAME, SINGLE_FILE]
    n = len(shards)
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_file(os.path.join(path, fname), shard, fetch)
        names.append(fname)
        for name, dt, shape in shard:
            weight_map[name] = fname
            total += math.prod(shape) * dt.itemsize
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return [CONFIG_NAME, INDEX_FILE] + names
