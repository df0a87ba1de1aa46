"""Hugging Face import/export (deepseek_jax/hf.py) and the safetensors reader/writer (deepseek_jax/safetensors_io.py).

Parity is checked in fp32 against transformers' DeepseekV3ForCausalLM on random tiny configs, both directions:
transformers.save_pretrained -> hf.load_pretrained -> our logits, and hf.save_pretrained -> transformers
from_pretrained -> its logits. Tests that need torch/transformers skip when they are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import config, hf, model
from deepseek_jax import safetensors_io as sio

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")
needs_transformers = pytest.mark.skipif(torch is None or transformers is None,
                                        reason="torch/transformers not installed")

TOL = 1e-4


@pytest.fixture
def quiet_transformers():
    """transformers prints a load report (the MTP layer is "unexpected" to it) and progress bars: silence them."""
    if transformers is None:
        yield
        return
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.logging.enable_progress_bar()
SEQ = 40  # longer than the YaRN configs' original_max_position_embeddings (16)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def random_variables(cfg, seed=0, std=0.15):
    """Random values for every leaf (norm scales around 1, router bias in [0, 0.5) so it changes routing)."""
    rs = np.random.RandomState(seed)
    out = {}
    for key, shape in hf.leaf_shapes(cfg).items():
        if key[0] == "router":
            a = rs.uniform(0.0, 0.5, shape)
        elif key[-1] == "scale":
            a = 1.0 + rs.normal(0.0, 0.2, shape)
        else:
            a = rs.normal(0.0, std, shape)
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jnp.asarray(a.astype(np.float32))
    return out


def tiny_cfg(**kw):
    base = dict(vocab_size=128, initializer_range=0.15, max_position_embeddings=64,
                rope_scaling=dict(factor=4.0, original_max_position_embeddings=16))
    base.update(kw)
    return config.preset("tiny", **base)


def leaves_equal(a, b):
    fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(k)
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=jax.tree_util.keystr(k))


def rewrite(path, edit):
    """Load a safetensors file, edit the dict of arrays, write it back with our writer."""
    tensors = sio.load_file(path)
    edit(tensors)
    sio.save_file(tensors, path)


# ---------------------------------------------------------------------------------------------------------------
# safetensors_io
# ---------------------------------------------------------------------------------------------------------------
@needs_torch
def test_safetensors_reader_matches_torch_writer(tmp_path):
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    g = torch.Generator().manual_seed(0)
    ref = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, 2, generator=g).to(torch.bfloat16),
        "f8": (torch.randn(4, 9, generator=g) * 20).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(5),
        "empty": torch.zeros(0, 3),
    }
    p = tmp_path / "torch.safetensors"
    torch_save(ref, str(p), metadata={"format": "pt"})

    def raw(t):  # bytes of a torch tensor, to compare bitwise whatever the dtype
        return t.contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)

    with sio.SafeTensorsFile(p) as f:
        assert sorted(f.keys()) == sorted(ref) and f.metadata == {"format": "pt"}
        assert f.dtype("f8") == np.dtype(ml_dtypes.float8_e4m3fn) and f.shape("f8") == (4, 9)
        assert f.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
        for k, t in ref.items():
            a = f.get(k)
            assert a.shape == tuple(t.shape) and not a.flags.writeable
            np.testing.assert_array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), raw(t), err_msg=k)
        np.testing.assert_array_equal(f.get("f8").astype(np.float32), ref["f8"].float().numpy())

    # our writer -> torch reader, bitwise
    q = tmp_path / "ours.safetensors"
    sio.save_file(sio.load_file(p), q)
    back = torch_load(str(q))
    for k, t in ref.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        np.testing.assert_array_equal(raw(back[k]), raw(t), err_msg=k)
    with sio.SafeTensorsFile(q) as f:
        assert f.metadata == {"format": "pt"}


def _raw_file(path, header, data: bytes, header_bytes=None):
    blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("case,header,data,match", [
    ("bad_json", None, b"", "invalid JSON"),
    ("out_of_file", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "outside"),
    ("overlap", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "overlap"),
    ("size_mismatch", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16), "needs 12"),
    ("hole", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "hole"),
    ("bad_dtype", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16), "dtype must be one of"),
    ("list_dtype", {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     r"dtype must be one of .*got a list"),
    ("dict_shape", {"a": {"dtype": "F32", "shape": {"n": 1}, "data_offsets": [0, 4]}}, bytes(4),
     "shape must be a list"),
    ("string_offsets", {"a": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}, bytes(4),
     r"data_offsets must be a list \[begin, end\]"),
    ("deep_nesting", None, b"", "nested deeper than 64 levels"),
    ("header_too_long", None, b"", "runs past the end"),
])
def test_safetensors_header_validation(tmp_path, case, header, data, match):
    p = tmp_path / f"{case}.safetensors"
    if case == "bad_json":
        _raw_file(p, None, data, header_bytes=b"{not json")
    elif case == "deep_nesting":  # used to raise RecursionError naming no file
        _raw_file(p, None, data, header_bytes=b"[" * 200_000)
    elif case == "header_too_long":
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", 1000) + b"{}")
    else:
        _raw_file(p, header, data)
    with pytest.raises(sio.SafeTensorsError, match=match) as e:
        sio.SafeTensorsFile(p)
    assert str(p) in str(e.value) and isinstance(e.value, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# the name mapping and config.json
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    tiny_cfg(),
    config.preset("tiny-v2-lite"),
    tiny_cfg(num_nextn_predict_layers=2, first_k_dense_replace=0, n_shared_experts=0),
    tiny_cfg(first_k_dense_replace=3, num_nextn_predict_layers=0),
], ids=["tiny", "v2-lite", "mtp2-all-moe-no-shared", "all-dense"])
def test_tensor_map_covers_every_parameter_exactly_once(cfg):
    shapes = hf.leaf_shapes(cfg)
    entries = list(hf.tensor_map(cfg))
    names = [m.hf_name for m in entries]
    assert len(names) == len(set(names))
    covered = {k: np.zeros(s, np.int32) for k, s in shapes.items()}
    for m in entries:
        if m.shared_with is None:
            covered[(m.collection,) + m.path][m.index] += 1
    for k, c in covered.items():
        assert (c == 1).all(), k
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    for j in range(D):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight"):
            assert f"model.layers.{L + j}.{suffix}" in names
    assert not any(n.startswith(f"model.layers.{L + D}.") for n in names)


@needs_transformers
def test_config_spellings_round_trip():
    for name in ("tiny", "tiny-v2-lite", "deepseek-v3-671b", "deepseek-v2-lite"):
        cfg = config.preset(name)
        assert config.ModelConfig.from_hf(cfg.to_hf()) == cfg
    # transformers writes rope_parameters + head_dim (= qk_rope_head_dim) + dtype; the hub writes rope_theta +
    # rope_scaling: both must give the same config, and "dtype" must not leak into the compute dtype.
    tc = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, max_position_embeddings=64, dtype="bfloat16",
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1})
    new = tc.to_dict()
    assert new["head_dim"] == 8 and "rope_parameters" in new
    from_new = config.ModelConfig.from_hf(new)
    hub = {k: v for k, v in new.items() if k not in ("rope_parameters", "head_dim", "dtype")}
    hub["rope_theta"] = 50000.0
    hub["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                           "beta_fast": 32, "beta_slow": 1}
    assert config.ModelConfig.from_hf(hub) == from_new
    assert from_new.rope_theta == 50000.0 and from_new.rope_scaling.mscale is None
    assert from_new.dtype == "float32" and from_new.qk_rope_head_dim == 8
    assert config.ModelConfig.from_hf(from_new.to_hf()) == from_new


# ---------------------------------------------------------------------------------------------------------------
# parity: transformers.save_pretrained -> hf.load_pretrained
# ---------------------------------------------------------------------------------------------------------------
_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
             q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
             num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.15,
             num_nextn_predict_layers=0)
_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}

PARITY_CASES = {
    # q compression, group-limited routing (4 groups, keep 2), YaRN with mscale = mscale_all_dim = 1 (V3's)
    "qlora-groups-yarn-mscale": dict(rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # no q compression, every layer MoE (no dense stack), YaRN without mscale keys
    "no-qlora-all-moe-yarn-no-mscale": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=2, topk_group=1,
                                            rope_scaling=dict(_YARN)),
    # unnormalized top-k weights with a scaling factor, two dense layers, two shared experts, top-3, plain RoPE
    "no-norm-topk-scaled-2dense": dict(norm_topk_prob=False, routed_scaling_factor=1.7, first_k_dense_replace=2,
                                       n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1),
    # mscale != mscale_all_dim (cos/sin factor 1.0 no longer), rms_norm_eps not 1e-6
    "yarn-mscale-differ-eps": dict(rope_scaling={**_YARN, "mscale": 0.9, "mscale_all_dim": 0.707},
                                   rms_norm_eps=1e-5, n_group=2, topk_group=1),
    # the newer `rope_parameters` spelling (rope_theta inside); MTP depth 1 in config.json but no MTP tensors
    "rope-parameters-spelling": dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1),
}


@needs_transformers
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_load_transformers_checkpoint_parity(tmp_path, case, quiet_transformers):
    hf_cfg = transformers.DeepseekV3Config(**{**_BASE, **PARITY_CASES[case]})
    torch.manual_seed(0)
    ref_model = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norm scales, so a swapped norm cannot hide
                p.add_(0.2 * torch.randn_like(p))
        for layer in ref_model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.5)
    ref_model.save_pretrained(tmp_path)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(ids).logits.numpy()
    assert 0.3 < np.abs(ref).mean() and np.abs(ref).max() < 50  # logits of order 1

    load_mtp = hf_cfg.num_nextn_predict_layers == 0
    if not load_mtp:  # transformers drops the MTP layer but keeps num_nextn_predict_layers in config.json
        with pytest.raises(ValueError, match=r"model\.layers\.3\..*load_mtp=False"):
            hf.load_pretrained(tmp_path)
    cfg, variables = hf.load_pretrained(tmp_path, load_mtp=False)
    assert cfg.num_nextn_predict_layers == 0
    assert (cfg.rope_scaling is None) == ("rope_scaling" not in PARITY_CASES[case]
                                          and "rope_parameters" not in PARITY_CASES[case])
    apply = jax.jit(model.Transformer(cfg).apply)
    logits = np.asarray(apply(variables, jnp.asarray(ids.numpy())).logits)
    err = float(np.abs(logits - ref).max())
    print(f"{case}: max |logits - transformers| = {err:.2e} (max |logits| {np.abs(ref).max():.2f})")
    assert err <= TOL

    # the router bias matters here (so loading it is what the parity above checks)
    no_bias = {**variables, "router": jax.tree_util.tree_map(jnp.zeros_like, variables["router"])}
    assert np.abs(np.asarray(apply(no_bias, jnp.asarray(ids.numpy())).logits) - ref).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# hf.save_pretrained -> transformers, and our own round trip
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny model with MTP, random weights, saved in one file by hf.save_pretrained."""
    cfg = tiny_cfg()
    variables = random_variables(cfg, seed=0)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    hf.save_pretrained(cfg, variables, path)
    return cfg, variables, path


@needs_transformers
def test_save_pretrained_loads_in_transformers_with_same_logits(tiny_ckpt, quiet_transformers):
    cfg, variables, path = tiny_ckpt
    ref_model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(path, output_loading_info=True)
    ref_model = ref_model.float().eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    L = cfg.num_hidden_layers
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    out = jax.jit(model.Transformer(cfg).apply)(variables, jnp.asarray(ids))
    err = float(np.abs(np.asarray(out.logits) - ref).max())
    print(f"save->transformers: max |logits - transformers| = {err:.2e} (max |logits| {np.abs(ref).max():.2f})")
    assert 0.3 < np.abs(ref).mean() and err <= TOL
    # and the expert weights transformers fused from our per-expert tensors are ours
    e = ref_model.model.layers[1].mlp.experts
    F = cfg.moe_intermediate_size
    ours = variables["params"]["moe_layers"]["mlp"]
    np.testing.assert_array_equal(e.gate_up_proj[3, :F].detach().numpy(), np.asarray(ours["experts_gate"][0, 3]).T)
    np.testing.assert_array_equal(e.gate_up_proj[3, F:].detach().numpy(), np.asarray(ours["experts_up"][0, 3]).T)
    np.testing.assert_array_equal(e.down_proj[5].detach().numpy(), np.asarray(ours["experts_down"][0, 5]).T)


def test_sharded_round_trip_with_mtp_is_bitwise(tmp_path):
    cfg = tiny_cfg(num_nextn_predict_layers=2)
    variables = random_variables(cfg, seed=1)
    files = hf.save_pretrained(cfg, variables, tmp_path, max_shard_bytes=64_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and set(shards) == set(files[2:])
    assert not (tmp_path / hf.SINGLE_FILE).exists()
    L = cfg.num_hidden_layers
    for j in range(2):
        for s in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                  "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight",
                  "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{L + j}.{s}" in index["weight_map"]
    for s in shards:  # packed in order, each shard within the limit unless it holds a single larger tensor
        with sio.SafeTensorsFile(tmp_path / s) as f:
            assert sum(f.nbytes(k) for k in f.keys()) <= 64_000 or len(f) == 1
    with sio.SafeTensorsFile(tmp_path / index["weight_map"]["model.layers.1.mlp.gate.e_score_correction_bias"]) as f:
        assert f.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == np.float32
        assert f.metadata == {"format": "pt"}

    cfg2, back = hf.load_pretrained(tmp_path)
    assert cfg2 == cfg
    leaves_equal(back, variables)
    assert "mtp_1" in back["params"] and back["router"]["mtp_1"]["block"]["mlp"]["router"]["bias"].shape == (8,)
    # load_mtp=False ignores MTP layers that are present
    cfg0, back0 = hf.load_pretrained(tmp_path, load_mtp=False)
    assert cfg0.num_nextn_predict_layers == 0
    leaves_equal(back0, {c: {k: v for k, v in variables[c].items() if not k.startswith("mtp_")}
                         for c in variables})
    # variables that do not fit the config are refused
    with pytest.raises(ValueError, match="mtp_1"):
        hf.save_pretrained(cfg0.replace(num_nextn_predict_layers=1), variables, tmp_path / "bad")

    # bf16 storage: loads back as the bf16 rounding of the fp32 weights; the router bias stays fp32
    hf.save_pretrained(cfg, variables, tmp_path, dtype="bfloat16")  # replaces the sharded files
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    cfg3, back16 = hf.load_pretrained(tmp_path, dtype="bfloat16")
    assert cfg3.param_dtype == "bfloat16" and cfg3.dtype == "bfloat16"
    want = {"params": jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables["params"]),
            "router": variables["router"]}
    leaves_equal(back16, want)


# ---------------------------------------------------------------------------------------------------------------
# FP8 block-quantized checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _quantize_blocks(w, block=128):
    """Per 128x128 block: scale = amax / 448, q = (w / scale) as float8_e4m3fn. Returns (q, scale, dequantized)."""
    out_dim, in_dim = w.shape
    nb_o, nb_i = -(-out_dim // block), -(-in_dim // block)
    scale = np.ones((nb_o, nb_i), np.float32)
    for i in range(nb_o):
        for j in range(nb_i):
            amax = np.abs(w[i * block:(i + 1) * block, j * block:(j + 1) * block]).max()
            scale[i, j] = max(amax, 1e-12) / 448.0
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:out_dim, :in_dim]
    q = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale, q.astype(np.float32) * full


@needs_torch
def test_fp8_block_quantized_checkpoint(tmp_path):
    from safetensors.torch import save_file as torch_save

    # dims that are not multiples of 128 (160, 200, 136, 320), several blocks with partial edges
    cfg = config.ModelConfig(
        vocab_size=96, hidden_size=160, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=200,
        moe_intermediate_size=136, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64,
        initializer_range=0.02)
    src = tmp_path / "src"
    hf.save_pretrained(cfg, random_variables(cfg, seed=3, std=0.05), src)
    tensors = sio.load_file(src / hf.SINGLE_FILE)
    weights, scales, reference, original = {}, {}, {}, {}
    for name, w in tensors.items():
        skip = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight")
        if w.ndim == 2 and not any(s in name for s in skip):
            q, s, deq = _quantize_blocks(w)
            weights[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            scales[name + "_scale_inv"] = torch.from_numpy(s)
            reference[name], original[name] = deq, w
        else:
            weights[name] = torch.from_numpy(np.ascontiguousarray(w))
    assert any(w.shape[0] % 128 and w.shape[0] > 128 for w in original.values())
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    # weights in one shard, their scales in another: the loader must pair them across files
    torch_save(weights, str(ckpt / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    torch_save(scales, str(ckpt / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {**{k: "model-00001-of-00002.safetensors" for k in weights},
          **{k: "model-00002-of-00002.safetensors" for k in scales}}
    (ckpt / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic", "fmt": "e4m3"}
    (ckpt / "config.json").write_text(json.dumps(hf_cfg))

    _, variables = hf.load_pretrained(ckpt)
    by_name = {m.hf_name: m for m in hf.tensor_map(cfg)}
    worst = 0.0
    for name, deq in reference.items():
        m = by_name[name]
        leaf = np.asarray(_get(variables[m.collection], m.path))
        got = leaf[m.index] if m.index else leaf
        np.testing.assert_array_equal(got, deq.T, err_msg=name)  # same fp32 product: bitwise
        rel = np.linalg.norm(deq - original[name]) / np.linalg.norm(original[name])
        worst = max(worst, rel)
        assert 1e-3 < rel < 0.08, (name, rel)
    print(f"fp8: {len(reference)} quantized tensors, worst relative error vs fp32 {worst:.3%}")

    # a quantized weight without its scale_inv
    missing = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
    shard2 = ckpt / "model-00002-of-00002.safetensors"
    rewrite(shard2, lambda t: t.pop(missing))
    del wm[missing]
    (ckpt / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight'.*scale") as e:
        hf.load_pretrained(ckpt)
    assert "model-00001-of-00002.safetensors" in str(e.value)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path, request):
    """A writable copy of tiny_ckpt; sharded (3+ files) when parametrized with True."""
    cfg, variables, src = tiny_ckpt
    dst = tmp_path / "ckpt"
    if getattr(request, "param", False):
        hf.save_pretrained(cfg, variables, dst, max_shard_bytes=100_000)
    else:
        shutil.copytree(src, dst)
    return cfg, dst


def _file_of(path, name):
    idx = path / hf.INDEX_FILE
    if idx.exists():
        return path / json.loads(idx.read_text())["weight_map"][name]
    return path / hf.SINGLE_FILE


def _edit(path, name, edit, drop_from_index=False, add_to_index=False):
    f = _file_of(path, name if not add_to_index else "model.layers.1.mlp.gate.weight")
    rewrite(f, edit)
    idx = path / hf.INDEX_FILE
    if idx.exists() and (drop_from_index or add_to_index):
        index = json.loads(idx.read_text())
        if drop_from_index:
            del index["weight_map"][name]
        else:
            index["weight_map"][name] = f.name
        idx.write_text(json.dumps(index))
    return f


@pytest.mark.parametrize("ckpt_copy", [False, True], ids=["single", "sharded"], indirect=True)
@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_bad_checkpoint_errors_name_tensor_and_file(ckpt_copy, problem):
    cfg, path = ckpt_copy
    if problem == "missing":
        name = "model.layers.2.mlp.experts.5.up_proj.weight"
        f = _edit(path, name, lambda t: t.pop(name), drop_from_index=True)
        where = hf.INDEX_FILE if (path / hf.INDEX_FILE).exists() else hf.SINGLE_FILE
        expect = str(path / where)
    elif problem == "unexpected":
        name = "model.layers.1.mlp.experts.99.up_proj.weight"
        f = _edit(path, name, lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)), add_to_index=True)
        expect = str(f)
    else:
        name = "model.layers.0.self_attn.kv_b_proj.weight"
        f = _edit(path, name, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
        expect = str(f)
    with pytest.raises(ValueError, match=problem.replace("misshaped", "shape")) as e:
        hf.load_pretrained(path)
    msg = str(e.value)
    assert repr(name) in msg and expect in msg, msg


def test_checkpoint_without_mtp_layers(ckpt_copy):
    cfg, path = ckpt_copy
    L = cfg.num_hidden_layers
    rewrite(path / hf.SINGLE_FILE, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{L}.")])
    with pytest.raises(ValueError, match=rf"missing tensor 'model\.layers\.{L}\..*load_mtp=False"):
        hf.load_pretrained(path)
    cfg2, variables = hf.load_pretrained(path, load_mtp=False)
    assert cfg2 == cfg.replace(num_nextn_predict_layers=0)
    assert not any(k.startswith("mtp_") for k in variables["params"]) and "mtp_0" not in variables["router"]


def test_ignored_and_shared_tensors(ckpt_copy):
    cfg, path = ckpt_copy
    L = cfg.num_hidden_layers
    emb = f"model.layers.{L}.embed_tokens.weight"

    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old checkpoints: ignored
        t[emb] = t[emb] + 1.0  # the MTP layer's copy of the shared embedding differs from the main one

    rewrite(path / hf.SINGLE_FILE, edit)
    with pytest.warns(UserWarning, match=rf"'{emb}'.*differs from 'model\.embed_tokens\.weight'"):
        _, variables = hf.load_pretrained(path)
    np.testing.assert_array_equal(np.asarray(variables["params"]["embed"]["embedding"]),
                                  sio.load_file(path / hf.SINGLE_FILE)["model.embed_tokens.weight"])
    # the copies are optional
    rewrite(path / hf.SINGLE_FILE, lambda t: (t.pop(emb), t.pop(f"model.layers.{L}.shared_head.head.weight")))
    hf.load_pretrained(path)



# ---------------------------------------------------------------------------------------------------------------
# checkpoint directories are untrusted input
# ---------------------------------------------------------------------------------------------------------------
def _index(path, weight_map):
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("entry", ["/etc/passwd", "../other/model.safetensors", "sub/model.safetensors", "..", ""])
def test_index_entries_outside_the_directory_are_refused_unopened(ckpt_copy, entry, monkeypatch):
    cfg, path = ckpt_copy
    names = list(sio.SafeTensorsFile(path / hf.SINGLE_FILE).keys())
    _index(path, {n: (entry if i == 0 else hf.SINGLE_FILE) for i, n in enumerate(names)})
    opened = []
    real = sio.SafeTensorsFile.__init__
    monkeypatch.setattr(sio.SafeTensorsFile, "__init__", lambda self, p: (opened.append(str(p)), real(self, p))[1])
    with pytest.raises(ValueError, match="is not a plain file name in the checkpoint directory") as e:
        hf.load_pretrained(path)
    assert hf.INDEX_FILE in str(e.value) and not opened
    assert "root:" not in str(e.value)  # nothing of /etc/passwd is read, let alone echoed


def test_fifo_entry_is_refused_without_blocking(ckpt_copy):
    import threading
    cfg, path = ckpt_copy
    os.mkfifo(path / "fifo.safetensors")
    names = list(sio.SafeTensorsFile(path / hf.SINGLE_FILE).keys())
    _index(path, {n: ("fifo.safetensors" if i == 0 else hf.SINGLE_FILE) for i, n in enumerate(names)})
    result = {}

    def load():
        try:
            hf.load_pretrained(path)
        except ValueError as e:
            result["error"] = str(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the loader blocked on a FIFO"
    assert "fifo.safetensors" in result["error"] and "not a regular file" in result["error"]
    with pytest.raises(sio.SafeTensorsError, match="not a regular file"):
        sio.SafeTensorsFile(path / "fifo.safetensors")


@pytest.mark.parametrize("doc,match", [
    ({"weight_map": ["model.safetensors"]}, "need a JSON object with a 'weight_map' object"),
    (["weight_map"], "need a JSON object with a 'weight_map' object"),
    ({"weight_map": {"model.embed_tokens.weight": ["model.safetensors"]}},
     r"weight_map\['model.embed_tokens.weight'\] must be a file name"),
    ("[" * 200_000, "nested deeper than 64 levels"),
])
def test_malformed_index_names_the_file_and_key(ckpt_copy, doc, match):
    cfg, path = ckpt_copy
    (path / hf.INDEX_FILE).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        hf.load_pretrained(path)
    assert str(path / hf.INDEX_FILE) in str(e.value)


def test_non_safetensors_file_content_is_not_echoed(ckpt_copy):
    cfg, path = ckpt_copy
    (path / hf.SINGLE_FILE).write_bytes(b"SECRET=hunter2\n" * 4)
    with pytest.raises(sio.SafeTensorsError) as e:
        hf.load_pretrained(path)
    assert str(struct.unpack("<Q", b"SECRET=h")[0]) not in str(e.value) and "hunter2" not in str(e.value)


@pytest.mark.parametrize("bad", ["nan", "inf", "zero", "negative", "int", "bool"])
def test_fp8_scales_must_be_finite_positive_floats(tmp_path, bad):
    """A block-quantized weight whose scale_inv is NaN, inf, 0, negative, int or bool used to load silently."""
    cfg = tiny_cfg()
    src = tmp_path / "src"
    hf.save_pretrained(cfg, random_variables(cfg, seed=1, std=0.05), src)
    tensors = sio.load_file(src / hf.SINGLE_FILE)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    w = tensors[name]
    q, s, _ = _quantize_blocks(w)
    s = {"nan": np.full_like(s, np.nan), "inf": np.full_like(s, np.inf), "zero": np.zeros_like(s),
         "negative": -s, "int": np.ones(s.shape, np.int32), "bool": np.ones(s.shape, bool)}[bad]
    tensors[name] = q.astype(ml_dtypes.float8_e4m3fn)
    tensors[name + "_scale_inv"] = s
    sio.save_file(tensors, src / hf.SINGLE_FILE)
    with pytest.raises(ValueError, match=r"up_proj.weight_scale_inv.*(not finite positive|must be fp32/bf16/fp16)"):
        hf.load_pretrained(src)
