"""DeepSeekMoE (2401.06066): shared expert vs none, fine-grained vs coarse experts, at equal activated expert
width (5 x 64 = 320 per token) and equal or near-equal total expert width.

    python -m experiments.sweep moe

Routing is plain top-k in all arms (n_group = topk_group = 1) so that only the expert layout changes.
  fine_shared    1 shared + 16 routed of width 64, top-4     (the base; DeepSeekMoE)    total width 1,088
  fine_noshared  0 shared + 17 routed of width 64, top-5                                   total width 1,088
  coarse         0 shared + 7 routed of width 160, top-2     (GShard-like, top-2)        total width 1,120
"""

from experiments.configs import base

EXPERIMENT = "moe"
SEEDS = base.SEEDS
_FLAT = {"model.overrides.n_group": 1, "model.overrides.topk_group": 1}
ARMS = {
    "fine_shared": dict(_FLAT),
    "fine_noshared": dict(_FLAT, **{"model.overrides.n_shared_experts": 0, "model.overrides.n_routed_experts": 17,
                                    "model.overrides.num_experts_per_tok": 5}),
    "coarse": dict(_FLAT, **{"model.overrides.n_shared_experts": 0, "model.overrides.n_routed_experts": 7,
                             "model.overrides.num_experts_per_tok": 2,
                             "model.overrides.moe_intermediate_size": 160}),
}
CLAIMS = [
    dict(id="loss_fine_vs_coarse", metric="loss", a="fine_shared", b="coarse", expect="less",
         paper_rel=(1.808 - 1.867) / 1.867,
         claim="Fine-grained experts with a shared expert beat coarse (GShard-style) experts at equal compute",
         paper="Pile loss 1.808 (DeepSeekMoE 2B) vs 1.867 (GShard 2B) [DeepSeekMoE]"),
    dict(id="loss_shared_vs_none", metric="loss", a="fine_shared", b="fine_noshared", expect="less",
         claim="Isolating a shared expert helps at equal activated parameters",
         paper="DeepSeekMoE §4.5 ablation (numbers not transcribed in docs/paper_numbers.md)"),
]


def get_config(arg="fine_shared"):
    return base.experiment_config(EXPERIMENT, ARMS, arg)
