import math

import pytest

from deepseek_jax import config, model
from deepseek_jax.config import ModelConfig, YarnConfig


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=1), "num_experts_per_tok"),  # 1 group of 2 kept
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-2), "num_attention_heads"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(moe_dispatch="magic"), "moe_dispatch"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(dtype="float8"), "dtype"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(eos_token_id=10_000), "eos_token_id"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(n_routed_experts=8, n_group=8, topk_group=2, num_experts_per_tok=2), "n_group"),  # 1 expert/group
])
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        config.preset("tiny", **changes)


def test_yarn_validation():
    with pytest.raises(ValueError, match="rope_scaling.factor"):
        YarnConfig(factor=0.5)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        config.preset("gpt-5")


@pytest.mark.parametrize("name", config.preset_names())
def test_presets_are_valid_and_frozen(name):
    cfg = config.preset(name)
    with pytest.raises(Exception):
        cfg.hidden_size = 3  # frozen
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_tiny_keeps_v3_topology():
    cfg = config.preset("tiny")
    assert cfg.q_lora_rank is not None and cfg.n_group > cfg.topk_group > 0
    assert cfg.n_shared_experts >= 1 and cfg.first_k_dense_replace >= 1 and cfg.num_moe_layers >= 1
    assert cfg.num_nextn_predict_layers >= 1 and cfg.rope_scaling is not None and cfg.scoring_func == "sigmoid"


def test_hf_round_trip_both_spellings():
    cfg = config.preset("deepseek-v3-671b")
    hf = cfg.to_hf()
    assert hf["rope_scaling"]["type"] == "yarn" and hf["q_lora_rank"] == 1536
    assert ModelConfig.from_hf(hf) == cfg
    # Newer transformers: rope_parameters (with rope_theta inside) and head_dim = qk_rope_head_dim.
    new = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(hf["rope_scaling"], rope_theta=hf["rope_theta"])
    del new["rope_parameters"]["type"]
    new["head_dim"] = 64
    assert ModelConfig.from_hf(new) == cfg


def test_hub_config_json_v3():
    # The released DeepSeek-V3 config.json (the keys that matter), as on the hub.
    hub = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
           "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
           "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
           "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1,
           "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
           "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
           "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
           "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "rope_theta": 10000,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]}}
    cfg = ModelConfig.from_hf(hub)
    ref = config.preset("deepseek-v3-671b")
    assert cfg.replace(initializer_range=ref.initializer_range) == ref


def test_from_hf_rejects_unsupported():
    hf = config.preset("tiny").to_hf()
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(dict(hf, hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_hf(dict(hf, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(dict(hf, model_type="llama"))


def _v3_params_by_hand():
    """Independent closed-form parameter count of DeepSeek-V3 from the published shapes."""
    d, H, V = 7168, 128, 129280
    qr, kr, dn, dr, dv = 1536, 512, 128, 64, 128
    attn = d * qr + qr + qr * H * (dn + dr) + d * (kr + dr) + kr + kr * H * (dn + dv) + H * dv * d
    dense_ffn, expert = 3 * d * 18432, 3 * d * 2048
    moe = 256 * expert + expert + d * 256  # routed + 1 shared + router (bias is a buffer, not a parameter)
    norms = 2 * d
    total = 3 * (attn + dense_ffn + norms) + 58 * (attn + moe + norms) + 2 * V * d + d
    activated = total - 58 * (256 - 8) * expert - V * d
    mtp = 2 * d + 2 * d * d + (attn + moe + norms) + d  # enorm, hnorm, eh_proj, block, shared_head.norm
    return total, activated, mtp


def test_count_params_v3_671b():
    c = model.count_params(config.preset("deepseek-v3-671b"))
    total, activated, mtp = _v3_params_by_hand()
    assert c == {"total": total, "activated": activated, "mtp": mtp}
    assert abs(c["total"] / 671.0e9 - 1) < 0.003
    assert 36.5e9 <= c["activated"] <= 37.7e9
    assert abs(c["mtp"] / 11.5e9 - 1) < 0.02


def test_count_params_v2_lite_matches_paper():
    c = model.count_params(config.preset("deepseek-v2-lite"))
    # Paper: 15.7B total, 2.4B activated (we count 2.45B; with the input embedding it would be 2.66B).
    assert round(c["total"] / 1e9, 1) == 15.7 and 2.4e9 <= c["activated"] < 2.5e9 and c["mtp"] == 0


def test_kv_cache_per_token_v3():
    cfg = config.preset("deepseek-v3-671b")
    assert cfg.kv_cache_elements_per_token_per_layer == 576
    assert cfg.kv_cache_elements_per_token_per_layer * cfg.num_hidden_layers == 35_136
    # PAPER.md: 1.76% of MHA's cache (MHA with 128 heads of 128-dim K and V: 2 * 128 * 128 per layer).
    assert math.isclose(576 / (2 * 128 * 128), 0.0176, rel_tol=0.01)


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size": "64"}, "ModelConfig.hidden_size"),
    ({"rms_norm_eps": "1e-6"}, "ModelConfig.rms_norm_eps"),
    ({"rope_theta": "10000"}, "rope_theta"),
    ({"routed_scaling_factor": "2.5"}, "ModelConfig.routed_scaling_factor"),
    ({"initializer_range": None}, "ModelConfig.initializer_range"),
    ({"norm_topk_prob": "true"}, "ModelConfig.norm_topk_prob"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"eos_token_id": ["1"]}, "eos_token_id"),
    ({"bos_token_id": "0"}, "ModelConfig.bos_token_id"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"rope_parameters": [1]}, "rope_parameters"),
    ({"rope_scaling": {"type": "yarn", "factor": "40"}}, "ModelConfig.rope_scaling.factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": "4096"}},
     "ModelConfig.rope_scaling.original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "mscale": [1]}}, "ModelConfig.rope_scaling.mscale"),
])
def test_malformed_config_json_values_name_the_field(changes, field):
    """Each used to crash inside config.py (TypeError, IndexError, AttributeError) without naming the field."""
    hf = dict(config.preset("tiny").to_hf(), **changes)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf(hf)


def test_config_json_must_be_an_object():
    with pytest.raises(ValueError, match="config.json: a JSON object expected, got list"):
        ModelConfig.from_hf([config.preset("tiny").to_hf()])
