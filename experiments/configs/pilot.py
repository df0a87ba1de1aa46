"""The pilot: runs on held-out seeds (100-102, never used by a reported arm) that fix the CPU recipe's free
choices before the reported runs start (docs/experiments.md "Pilot").

    python -m experiments.sweep pilot --workers 2

1. Bias speed (seed 100): the aux-loss-free arm of balancing.py at gamma 0.001 (the paper's), 0.003, 0.01, 0.03,
   full length, the paper's schedule shape (constant, then 0 for the last 3.4% of steps). The rule, fixed before
   the runs: the gamma with the lowest mean MaxVio_global over the validation evaluations in the second half of
   the run (steps >= 750: low *and* stable), the smaller gamma on a tie within 0.02. experiments/configs/base.py's
   GAMMA is that value.
2. Paired noise (seeds 100, 101, 102): two contrasts at full length with the chosen gamma, one whose arms share
   their initialisation (balancing's aux_free vs seq_aux: same parameter shapes) and one whose arms cannot
   (attention's mla vs mha: different shapes). The standard deviation of their per-seed differences is the noise
   experiments/sweep.py's power analysis (RESULTS.md "Power") starts from.
3. Peak learning rate (seeds 100, 101, 102): the same-init contrast again at half the base's peak LR (1e-3, the
   schedule's later stages scaled with it). Added after step 2 found the paired noise of the loss large (the
   arms' per-seed gaps set in during the first 750 steps and persist); the rule, fixed before these runs: the
   base keeps 2e-3 unless 1e-3 gives both a smaller paired SD of the loss and a mean validation loss no worse
   than 2e-3's by more than that SD. Outcome: 1e-3 (base.PEAK_LR); the arms of steps 1-2 keep the 2e-3 they ran
   with (base.PILOT_LR).
"""

from deepseek_jax.train.step import default_train_config
from experiments.configs import attention, balancing, base

EXPERIMENT = "pilot"
GAMMAS = (0.001, 0.003, 0.01, 0.03)
GAMMA_SEEDS = (100,)
NOISE_SEEDS = (100, 101, 102)
SEEDS = NOISE_SEEDS
SECOND_HALF = base.TOTAL_STEPS // 2  # the selection window of the bias-speed rule
TIE = 0.02

LOW_LR = 1e-3


def _lr_diff(peak_lr: float) -> dict:
    """The schedule fields that follow the peak LR, as an arm diff (the base's warmup and phases otherwise)."""
    o = default_train_config(base.TOTAL_STEPS, peak_lr=peak_lr, warmup_steps=base.WARMUP_STEPS).optim
    return {f"train.optim.{k}": o[k] for k in ("peak_lr", "cosine_end_lr", "final_stages")}


# Steps 1 and 2 ran at the first recipe's peak LR (base.PILOT_LR), which their arms pin: step 3 moved the base's.
_STEP12 = _lr_diff(base.PILOT_LR)
ARMS = {f"gamma_{g:g}": dict(balancing.ARMS["aux_free"], **{"train.balance.gamma": g}, **_STEP12) for g in GAMMAS}
ARMS.update({f"noise_{a}": dict(balancing.ARMS[a], **_STEP12) for a in ("aux_free", "seq_aux")})
ARMS.update({f"noise_{a}": dict(attention.ARMS[a], **_STEP12) for a in ("mla", "mha")})
ARMS.update({f"lr1e-3_{a}": dict(balancing.ARMS[a], **_lr_diff(LOW_LR)) for a in ("aux_free", "seq_aux")})
ARM_SEEDS = {arm: (GAMMA_SEEDS if arm.startswith("gamma_") else NOISE_SEEDS) for arm in ARMS}
# the paired contrasts of step 2: (name, arm a, arm b, whether a and b share their initialisation)
NOISE_PAIRS = (("same_init", "noise_aux_free", "noise_seq_aux", True),
               ("different_init", "noise_mla", "noise_mha", False),
               ("same_init_lr1e-3", "lr1e-3_aux_free", "lr1e-3_seq_aux", True))
# The contrast whose paired SD stands for each kind of claim noise in the power analysis, at the base's recipe: the
# same-init contrast was measured again at LOW_LR (step 3), the different-init one only at base.PILOT_LR (an
# estimate for the base's LR, stated in RESULTS.md "Power").
NOISE_AT_BASE = {"same_init": "same_init_lr1e-3" if base.PEAK_LR == LOW_LR else "same_init",
                 "different_init": "different_init"}
CLAIMS = []  # the pilot decides no claim; experiments/sweep.py reads it for the bias speed and the power analysis


def get_config(arg="gamma_0.01"):
    return base.experiment_config(EXPERIMENT, ARMS, arg)
