"""Load balancing (V3 §2.1.2, §4.5.2-4.5.3; LF 2408.15664): aux-loss-free bias vs sequence-wise aux loss vs
batch-wise aux loss vs nothing, on the CPU base model (experiments/configs/base.py).

    python -m experiments.sweep balancing                     # 4 arms x 3 seeds (not batch_aux), then the tables
    python -m experiments.run --config=experiments/configs/balancing.py:aux_free,seed=1
    python -m experiments.run --config=experiments/configs/balancing.py:aux_free,scale=paper ...  # a cluster

Arms (each a diff over the base, which has gamma base.GAMMA (the pilot's choice), alpha 1e-4 sequence-wise, bias
update on):
  aux_free   bias update only (alpha 0): LF's "Loss-Free Balancing"
  seq_aux    sequence-wise aux loss only (no bias update), alpha 0.01
  batch_aux  the same loss over the whole batch (V3 §4.5.3), alpha 0.01
  none       neither
  aux_free_paper_gamma  aux_free at the paper's own bias speed, gamma 0.001 (V3 §2.1.2), instead of the pilot's
  seq_aux_paper_alpha   seq_aux at LF's own aux-loss strength, alpha 0.001 (LF §4.1)
alpha: LF's aux-loss baseline and V3's ablations use 0.001 / 1e-4 over 10^11+ tokens; a 1,500-step run needs a
stronger pull to show any effect in 3M tokens, so seq_aux and batch_aux use 0.01 (a deviation, stated here).
seq_aux_paper_alpha is the aux-loss baseline at the strength LF measured its MaxVio 0.72 with, added with two
claims after the alpha-0.01 verdicts were known (REVISION, below).
"""

from experiments.configs import base

EXPERIMENT = "balancing"
SEEDS = base.SEEDS
TRAJECTORIES = True  # experiments/sweep.py draws balancing/maxvio.png: MaxVio and router-bias trajectories
ALPHA = 0.01
PAPER_GAMMA = 0.001
PAPER_ALPHA = 1e-3  # LF §4.1's aux-loss strength
ARMS = {
    "aux_free": {"train.balance.alpha": 0.0, "train.balance.bias_update": True},
    "seq_aux": {"train.balance.alpha": ALPHA, "train.balance.bias_update": False},
    "batch_aux": {"train.balance.alpha": ALPHA, "train.balance.bias_update": False,
                  "train.balance.scope": "batch"},
    "none": {"train.balance.alpha": 0.0, "train.balance.bias_update": False},
    # the paper's bias speed, tuned for 14.8T tokens: does the mechanism still work at 3M tokens?
    "aux_free_paper_gamma": {"train.balance.alpha": 0.0, "train.balance.bias_update": True,
                             "train.balance.gamma": PAPER_GAMMA},
    # LF's aux-loss baseline at its own strength: the configuration the paper's MaxVio 0.72 was measured in
    "seq_aux_paper_alpha": {"train.balance.alpha": PAPER_ALPHA, "train.balance.bias_update": False},
}
# batch_aux serves only the two validation-loss claims about the batch-wise loss, which the power analysis finds
# unresolvable with this suite's 3 seeds (RESULTS.md "Power": the paper's 0.22% effect needs ~140 seeds, the 1%
# equivalence band 7 for its MDD alone, at the pilot's paired noise): not run by a sweep unless --force
# (experiments/sweep.py, planned_arms).
UNRESOLVABLE_ARMS = ("batch_aux",)
# Paper scale (``<arm>,scale=paper``, base.paper_base_config: the 15.7B MoE, V3's recipe; for a cluster): the
# papers' own strengths, gamma 0.001 (V3 §2.1.2) and alpha 0.001 for the aux-loss baselines (LF §4.1; V3 §4.5.2
# uses "the same as DeepSeek-V2-Lite", which docs/paper_numbers.md does not give). aux_free_paper_gamma is a
# CPU-scale arm (at paper scale the base's gamma already is the paper's), and so is seq_aux_paper_alpha (at paper
# scale seq_aux already has the paper's alpha).
PAPER_ARMS = {
    "aux_free": {"train.balance.alpha": 0.0, "train.balance.bias_update": True},
    "seq_aux": {"train.balance.alpha": PAPER_ALPHA, "train.balance.bias_update": False},
    "batch_aux": {"train.balance.alpha": PAPER_ALPHA, "train.balance.bias_update": False,
                  "train.balance.scope": "batch"},
    "none": {"train.balance.alpha": 0.0, "train.balance.bias_update": False},
}
# The revised claim list: the MaxVio rows' paper figures (MaxVio_global 0.04 vs 0.72) come from LF's baseline at
# alpha 0.001, but the CPU design compared against alpha 0.01, ten times stronger. Those rows stay as they were
# (their verdicts were known when this was written); the same two comparisons (at the pilot's gamma and at the
# paper's) against the baseline the paper measured are two more rows, with their arm and their verdict rule (the
# same paired 2-SE rule) fixed before its runs. The second is LF's own configuration on both sides.
REVISION = ("Added after the alpha-0.01 rows' verdicts were known and before any result of seq_aux_paper_alpha "
            "existed: LF's 0.72 is its aux-loss baseline at alpha 0.001, while seq_aux uses 0.01 "
            "(experiments/configs/balancing.py).")
LF_MAXVIO_REL = (0.04 - 0.72) / 0.72  # LF's 1B MaxVio_global, aux-free vs aux loss, as a relative difference
CLAIMS = [
    dict(id="maxvio_aux_free_vs_aux", metric="max_vio_global", a="aux_free", b="seq_aux", expect="less",
         paper_rel=LF_MAXVIO_REL,
         claim="Aux-loss-free balancing reaches a lower MaxVio_global than an auxiliary loss",
         paper="MaxVio_global 0.04 (aux-free) vs 0.72 (aux loss), 1B model [LF]"),
    dict(id="maxvio_aux_free_vs_none", metric="max_vio_global", a="aux_free", b="none", expect="less",
         claim="The bias update balances the load (vs no balancing at all)",
         paper="implied by LF Fig. 3 (aux-free MaxVio_batch falls during training)"),
    dict(id="maxvio_paper_gamma_vs_aux", metric="max_vio_global", a="aux_free_paper_gamma", b="seq_aux",
         expect="less", paper_rel=LF_MAXVIO_REL,
         claim="The same at the paper's own bias speed (gamma 0.001)",
         paper="MaxVio_global 0.04 (aux-free, gamma 0.001) vs 0.72 (aux loss), 1B model [LF]"),
    dict(id="maxvio_aux_free_vs_paper_alpha_aux", metric="max_vio_global", a="aux_free", b="seq_aux_paper_alpha",
         expect="less", paper_rel=LF_MAXVIO_REL, revision=REVISION,
         claim="Aux-loss-free balancing reaches a lower MaxVio_global than the aux loss at LF's strength (alpha 0.001)",
         paper="MaxVio_global 0.04 (aux-free) vs 0.72 (aux loss, alpha 0.001), 1B model [LF]"),
    dict(id="maxvio_paper_gamma_vs_paper_alpha_aux", metric="max_vio_global", a="aux_free_paper_gamma",
         b="seq_aux_paper_alpha", expect="less", paper_rel=LF_MAXVIO_REL, revision=REVISION,
         claim="The same in LF's own configuration (gamma 0.001 vs alpha 0.001)",
         paper="MaxVio_global 0.04 (aux-free, gamma 0.001) vs 0.72 (aux loss, alpha 0.001), 1B model [LF]"),
    dict(id="loss_aux_free_vs_aux", metric="loss", a="aux_free", b="seq_aux", expect="less",
         paper_rel=(2.253 - 2.258) / 2.258,
         claim="Aux-loss-free balancing gives a lower validation loss than a sequence-wise aux loss",
         paper="validation loss 2.253 (aux-free) vs 2.258 (seq-wise aux), 1B [V3 §4.5.3]"),
    dict(id="loss_batch_vs_aux_free", metric="loss", a="batch_aux", b="aux_free", expect="equal",
         claim="A batch-wise aux loss matches aux-free balancing in validation loss",
         paper="validation loss 2.253 (batch-wise) vs 2.253 (aux-free), 1B [V3 §4.5.3]"),
    dict(id="loss_batch_vs_seq", metric="loss", a="batch_aux", b="seq_aux", expect="less",
         paper_rel=(2.253 - 2.258) / 2.258,
         claim="A batch-wise aux loss beats the sequence-wise one in validation loss",
         paper="validation loss 2.253 (batch-wise) vs 2.258 (seq-wise), 1B [V3 §4.5.3]"),
]


def get_config(arg="aux_free"):
    return base.experiment_config(EXPERIMENT, ARMS, arg, paper_arms=PAPER_ARMS)
