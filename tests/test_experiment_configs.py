"""experiments/configs: every arm of every experiment builds a valid run config and model; the arms' matching
claims hold by arithmetic (attention pairs at matched parameters, MoE arms at equal activated expert width,
scaling's compute span and DeepSeek LLM's laws); paper-scale presets match PAPER.md's counts."""

import math
import os

import pytest

from deepseek_jax import config, model
from deepseek_jax.train import loop as loop_lib
from experiments import sweep
from experiments.configs import attention, balancing, base, fp8, moe, mtp, scaling


@pytest.mark.parametrize("name", sweep.EXPERIMENTS)
def test_every_arm_builds(name):
    mod = sweep.load_experiment(name)
    assert len(mod.SEEDS) >= 3 and mod.CLAIMS
    for arm in mod.ARMS:
        cfg = mod.get_config(f"{arm},seed=2")
        assert cfg.loop.seed == 2 and cfg.data.seed == 2 and cfg.loop.out_dir.endswith(f"{name}/{arm}/seed2")
        base.arm_model_config(cfg)  # ModelConfig validates the arm's overrides
        for claim in mod.CLAIMS:
            for k in ("a", "b"):
                assert k not in claim or claim[k] in mod.ARMS


def test_bad_arm_and_key_are_named():
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        attention.get_config("nope")
    with pytest.raises(ValueError, match="train.balance.alfa"):
        base.experiment_config("x", {"a": {"train.balance.alfa": 1.0}}, "a")


def test_attention_pairs_matched_within_half_percent():
    for a, b in attention.MATCHED_PAIRS:
        pa = base.derived_values(attention.get_config(a))["params_total"]
        pb = base.derived_values(attention.get_config(b))["params_total"]
        assert abs(pa / pb - 1) < 0.005, (a, b, pa, pb)
    # KV bytes/token (bf16, 3 layers): MLA (r + rope 16) vs MHA 4 heads x (32 + 32)
    assert base.derived_values(attention.get_config("mla"))["kv_bytes_per_token"] == (96 + 16) * 3 * 2
    assert base.derived_values(attention.get_config("mha"))["kv_bytes_per_token"] == 4 * 64 * 3 * 2


def test_moe_arms_equal_activated_width():
    widths = {}
    for arm in moe.ARMS:
        c = base.arm_model_config(moe.get_config(arm))
        widths[arm] = (c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts),
                       c.moe_intermediate_size * (c.n_routed_experts + c.n_shared_experts))
    assert {w[0] for w in widths.values()} == {320}
    assert widths["fine_shared"][1] == widths["fine_noshared"][1] == 1088 and widths["coarse"][1] == 1120


def test_scaling_plan_follows_deepseek_llm_laws():
    cs = list(scaling.COMPUTE.values())
    assert max(cs) / min(cs) >= 30 and len(cs) >= 5
    for arm in scaling.SIZES:
        p = scaling.arm_plan(arm)
        L, d = p["n_layer"], p["d_model"]
        assert p["M"] == 72 * L * d * d + 12 * L * d * 128
        assert math.isclose(p["eta"], 0.3118 * p["C"] ** -0.125)
        assert p["batch"] == max(2, round(0.2920 * p["C"] ** 0.3271 / 128))
        # on the compute-optimal frontier: M near M_opt(C), tokens near D_opt(C), the budget really spent
        assert abs(p["M"] / (0.1715 * p["C"] ** 0.5243) - 1) < 0.12, arm
        assert abs(p["tokens"] / (5.8316 * p["C"] ** 0.4757) - 1) < 0.12, arm
        assert abs(p["C_trained"] / p["C"] - 1) < 0.01 and p["tokens"] == p["steps"] * p["batch"] * 128
        c = base.arm_model_config(scaling.get_config(arm))
        # dense MHA with 12 d^2 parameters per layer (+ norms), as M assumes
        per_layer = 4 * d * d + 3 * d * round(8 * d / 3)
        counted = model.count_params(c)["total"] - 2 * c.vocab_size * d - d  # embedding, head, final norm
        assert counted == L * (per_layer + 2 * d)
        assert c.num_moe_layers == 0 and c.attention == "mha"


@pytest.mark.parametrize("name, total, activated", [
    ("deepseek-v3-671b", 671e9, 37e9),          # PAPER.md: 671B / 37B
    ("deepseek-v2-236b", 236e9, 21e9),          # PAPER.md: 236B / 21B
    ("ablation-small-moe-15.7b", 15.7e9, 2.4e9),  # PAPER.md / V3 §4.5: the small ablation MoE, 15.7B / 2.4B
])
def test_paper_scale_presets_match_paper_counts(name, total, activated):
    c = model.count_params(config.preset(name))
    assert abs(c["total"] / total - 1) < 0.01, c
    assert abs(c["activated"] / activated - 1) < 0.05, c


@pytest.mark.parametrize("exp, arm", [(balancing, "seq_aux"), (mtp, "mtp1"), (fp8, "fp8")])
def test_paper_scale_arms(exp, arm, tmp_path):
    """``<arm>,scale=paper``: the 15.7B MoE preset, V3's recipe (seq 4K, batch 3072 -> 15360 over 469B tokens,
    1.33T tokens in all, gamma 0.001), the arm's paper diff; the run refuses to start without a corpus."""
    c = exp.get_config(f"{arm},scale=paper,seed=1")
    assert c.model.preset == "ablation-small-moe-15.7b" and c.loop.out_dir == f"runs/paper/{exp.EXPERIMENT}/{arm}/seed1"
    counts = model.count_params(config.preset(c.model.preset))
    assert abs(counts["total"] / 15.7e9 - 1) < 0.01 and abs(counts["activated"] / 2.4e9 - 1) < 0.03
    assert (c.data.seq_len, c.data.batch_size, c.data.batch_ramp.start, c.data.batch_ramp.tokens) == (
        4096, 15360, 3072, 469e9)
    assert c.train.balance.gamma == 0.001 and c.train.optim.peak_lr == 2.2e-4 and c.data.fim_rate == 0.1
    # total_steps: the first step at which the ramped batches have covered 1.33T tokens (hand-rolled ramp)
    micro, seen, steps = 15360 // c.loop.grad_accum, 0, 0
    while seen < 1.33e12:
        bs = 3072 + (15360 - 3072) * min(1.0, seen / 469e9)
        seen += max(micro, int(bs / micro + 1e-9) * micro) * 4096
        steps += 1
    assert c.train.total_steps == steps
    for k, v in exp.PAPER_ARMS[arm].items():
        node = c
        for part in k.split("."):
            node = node[part]
        assert node == v, k
    c.loop.out_dir = str(tmp_path / "paper")
    with pytest.raises(loop_lib.RunError, match="data.corpus is empty"):
        loop_lib.run(c)
    assert not os.path.exists(tmp_path / "paper")


def test_cpu_shaped_experiments_have_no_paper_scale():
    with pytest.raises(ValueError, match="no paper-scale arm 'mla'"):
        attention.get_config("mla,scale=paper")
    with pytest.raises(ValueError, match="no paper-scale arm 'aux_free_paper_gamma'"):
        balancing.get_config("aux_free_paper_gamma,scale=paper")
    with pytest.raises(ValueError, match="expected 'seed=<int>' or 'scale=cpu|paper'"):
        mtp.get_config("none,scale=huge")


def test_quickstart_and_experiments_train_with_the_configured_warmup():
    """The documented warmup used to be capped at 1% of the run (1 step for the quickstart's first 120, 3 for the
    experiments' first 300; 48 committed runs record 3): every config now trains with the warmup it sets."""
    from experiments.configs import quickstart
    assert quickstart.get_config().train.optim.warmup_steps == 20
    assert base.base_config().train.optim.warmup_steps == base.WARMUP_STEPS == 100
    for name in ("balancing", "mtp", "attention", "moe", "fp8"):
        mod = sweep.load_experiment(name)
        for arm in mod.ARMS:
            assert mod.get_config(arm).train.optim.warmup_steps == base.WARMUP_STEPS, (name, arm)
