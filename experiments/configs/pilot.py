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
   than 2e-3's by more than that SD.
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

ARMS = {f"gamma_{g:g}": dict(balancing.ARMS["aux_free"], **{"train.balance.gamma": g}) for g in GAMMAS}
ARMS.update({f"noise_{a}": dict(balancing.ARMS[a]) for a in ("aux_free", "seq_aux")})
ARMS.update({f"noise_{a}": dict(attention.ARMS[a]) for a in ("mla", "mha")})
LOW_LR = 1e-3
_LOW_LR = default_train_config(base.TOTAL_STEPS, peak_lr=LOW_LR, warmup_steps=base.WARMUP_STEPS).optim
_LR_DIFF = {f"train.optim.{k}": _LOW_LR[k] for k in ("peak_lr", "cosine_end_lr", "final_stages")}
ARMS.update({f"lr1e-3_{a}": dict(balancing.ARMS[a], **_LR_DIFF) for a in ("aux_free", "seq_aux")})
ARM_SEEDS = {arm: (GAMMA_SEEDS if arm.startswith("gamma_") else NOISE_SEEDS) for arm in ARMS}
# the paired contrasts of step 2: (name, arm a, arm b, whether a and b share their initialisation)
NOISE_PAIRS = (("same_init", "noise_aux_free", "noise_seq_aux", True),
               ("different_init", "noise_mla", "noise_mha", False),
               ("same_init_lr1e-3", "lr1e-3_aux_free", "lr1e-3_seq_aux", True))
CLAIMS = []  # the pilot decides no claim; experiments/sweep.py reads it for the bias speed and the power analysis


def get_config(arg="gamma_0.01"):
    return base.experiment_config(EXPERIMENT, ARMS, arg)
