"""MLA vs MHA vs GQA at matched parameters (V2 §2.1, App. D): validation loss and KV-cache bytes per token.

    python -m experiments.sweep attention

All arms keep the base's query path (q compression), head dims (q/k 16 + 16 rope, v 32), 4 heads and RoPE; only
the KV path differs (deepseek_jax/layers/attention.py: MLA vs GQA). Parameters are matched in pairs by the MLA
latent rank, the one free dimension of MLA's KV path (per layer: MLA 321 r + 2,048 with kv_a, its norm and kv_b;
MHA/GQA 2 * 128 * 32 * kv_heads for k_proj and v_proj):
  mla   r = 96: 32,864 KV params/layer  <->  mha   (4 KV heads): 32,768
  mla_r44  r = 44: 16,172             <->  gqa2  (2 KV heads): 16,384
(tests/test_experiment_configs.py checks the pairs' totals agree within 0.5%.)
"""

from experiments.configs import base

EXPERIMENT = "attention"
SEEDS = base.SEEDS
ARMS = {
    "mla": {"model.overrides.kv_lora_rank": 96},
    "mha": {"model.overrides.attention": "mha"},
    "mla_r44": {"model.overrides.kv_lora_rank": 44},
    "gqa2": {"model.overrides.attention": "gqa", "model.overrides.num_key_value_heads": 2},
}
MATCHED_PAIRS = (("mla", "mha"), ("mla_r44", "gqa2"))
CLAIMS = [
    dict(id="kv_mla_vs_mha", metric="kv_bytes_per_token", a="mla", b="mha", expect="less",
         claim="MLA caches far fewer bytes per token than MHA",
         paper="KV cache 15.6K vs 110.6K elements/token, small models [V2 App. D]; V3: 576 vs 40,960 per layer"),
    dict(id="loss_mla_vs_mha", metric="loss", a="mla", b="mha", expect="less",
         claim="MLA is at least as good as MHA at matched parameters (the paper finds it better)",
         paper="MLA outperforms MHA at small and large scale [V2 App. D.2] (numbers not transcribed in "
               "docs/paper_numbers.md)"),
    dict(id="loss_mla_vs_gqa", metric="loss", a="mla_r44", b="gqa2", expect="less",
         claim="MLA beats GQA at matched parameters",
         paper="GQA and MQA fall below MHA, MLA above it [V2 App. D.1] (numbers not transcribed in "
               "docs/paper_numbers.md)"),
]


def get_config(arg="mla"):
    return base.experiment_config(EXPERIMENT, ARMS, arg)
