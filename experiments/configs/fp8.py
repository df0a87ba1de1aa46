"""FP8 training vs BF16 (V3 §3.3, App. B.1): the same model and data, compute dtype bfloat16 in both arms, the
FP8 arm with block-scaled E4M3 GEMMs (ModelConfig.fp8 = True: deepseek_jax/ops/fp8.py, docs/fp8.md).

    python -m experiments.sweep fp8

If this checkout's ModelConfig has no ``fp8`` field yet, experiments/sweep.py reports the FP8 arm as "not
available" instead of running it.
"""

from experiments.configs import base

EXPERIMENT = "fp8"
# The power analysis (RESULTS.md "Power": the pilot's paired noise at the base's LR) finds that FP8's
# equivalence claim (loss within 0.25%) needs ~110 seeds per arm, far more than a CPU budget allows, so the sweep
# spends no CPU-hours on it; `python -m experiments.sweep fp8 --force` runs the arms anyway.
SKIP_UNRESOLVABLE = True
SEEDS = base.SEEDS
ARMS = {
    "bf16": {"model.overrides.dtype": "bfloat16"},
    "fp8": {"model.overrides.dtype": "bfloat16", "model.overrides.fp8": True},
}
PAPER_ARMS = ARMS  # ``<arm>,scale=paper``: the same diffs over base.paper_base_config (the 15.7B MoE)
CLAIMS = [
    dict(id="loss_fp8_vs_bf16", metric="loss", a="fp8", b="bf16", expect="rel_within", tol=0.0025,
         claim="FP8 training's loss stays within 0.25% (relative) of BF16's",
         paper="relative loss error < 0.25%, ~16B and ~230B MoE, ~1T tokens [V3 App. B.1]"),
]


def get_config(arg="bf16"):
    return base.experiment_config(EXPERIMENT, ARMS, arg, paper_arms=PAPER_ARMS)
