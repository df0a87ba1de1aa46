"""Scaling (DeepSeek LLM §3): loss vs compute along DeepSeek LLM's compute-optimal allocation, five dense model
sizes of depth 2 spanning 46x in compute, each trained with the learning rate and batch size its fitted laws
prescribe.

    python -m experiments.sweep scaling

Each arm is a 2-layer dense MHA model of width d = 24, 32, 48, 64, 80 and the compute budget C at which its M is
compute-optimal, M = M_opt(C) = 0.1715 C^0.5243 (C from 2.3e11 to 1.1e13 FLOPs, 46x); it trains on D = C / M
tokens (= D_opt(C) = 5.8316 C^0.4757 to within the laws' rounding), so every size sits on the compute-optimal
frontier that the paper's loss-vs-compute power law describes. One depth for every size: an earlier design mixed
1- and 2-layer models, and the change of depth moved the loss as much as a step in compute did (R² 0.47). (A
still earlier one trained every size on the same tokens: the larger models were then further from converging,
and the loss rose with compute; that is the under-trained regime, not the frontier.)
M = 72 n_layer d^2 + 12 n_layer d l_seq is DeepSeek LLM's non-embedding FLOPs per token (forward + backward),
C = M * D. Hyper-parameters per size: eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 tokens (batch = B_opt /
l_seq sequences, rounded, >= 2), DeepSeek LLM's multi-step schedule: warmup (5% of steps, at most 2000), peak to 80%
of the steps, then x0.316 to 90%, then x0.1.
Model: dense (first_k_dense_replace = n_layer, no MoE), MHA with 2 heads, head dim d/2 split evenly between the
nope and the rope part, SwiGLU width round(8d/3), so the parameters per layer are 12 d^2 as M assumes (DeepSeek LLM
rotates the whole head; here RoPE covers half of it). Validation: the whole held-out set (278,115 tokens) for every
size, at four points of the run.
The exponent's confidence interval comes from one fit per seed (the seed fixes the data order at every size):
mean +- t(0.975, n-1) x SE over seeds (experiments/sweep.py, power_law).
"""

from experiments.configs import base

EXPERIMENT = "scaling"
SEQ_LEN = 128
SEEDS = (0, 1, 2, 3, 4)
SHAPES = {  # arm: (n_layer, d_model, heads); its compute budget is the C at which this M is M_opt(C)
    "s1": (2, 24, 2),
    "s2": (2, 32, 2),
    "s3": (2, 48, 2),
    "s4": (2, 64, 2),
    "s5": (2, 80, 2),
}


def flops_per_token(n_layer: int, d: int, seq: int = SEQ_LEN) -> int:
    """DeepSeek LLM's M (non-embedding FLOPs per token, forward + backward)."""
    return 72 * n_layer * d * d + 12 * n_layer * d * seq


def eta_opt(C: float) -> float:
    return 0.3118 * C ** -0.1250


def b_opt_tokens(C: float) -> float:
    return 0.2920 * C ** 0.3271


def m_opt(C: float) -> float:
    return 0.1715 * C ** 0.5243


def d_opt(C: float) -> float:
    return 5.8316 * C ** 0.4757


def c_for_m(M: float) -> float:
    """The compute budget at which M is compute-optimal: the inverse of m_opt."""
    return (M / 0.1715) ** (1 / 0.5243)


SIZES = {arm: (L, d, H, c_for_m(flops_per_token(L, d))) for arm, (L, d, H) in SHAPES.items()}


def arm_plan(arm: str) -> dict:
    L, d, H, C = SIZES[arm]
    M = flops_per_token(L, d)
    batch = max(2, round(b_opt_tokens(C) / SEQ_LEN))
    steps = max(1, round(C / M / (batch * SEQ_LEN)))
    # eta and B from the nominal budget; C_trained from the tokens the rounded batch and steps really see
    return {"n_layer": L, "d_model": d, "heads": H, "M": M, "C": C, "M_opt": m_opt(C), "D_opt": d_opt(C),
            "eta": eta_opt(C), "batch": batch, "steps": steps, "tokens": steps * batch * SEQ_LEN,
            "C_trained": M * steps * batch * SEQ_LEN}


def _arm(arm: str) -> dict:
    p = arm_plan(arm)
    L, d, H = p["n_layer"], p["d_model"], p["heads"]
    dk = d // H
    steps, lr = p["steps"], p["eta"]
    warm = max(1, min(2000, round(0.05 * steps)))
    s80, s90 = round(0.8 * steps), round(0.9 * steps)
    return {
        "train.total_steps": steps,
        "model.overrides.hidden_size": d, "model.overrides.num_hidden_layers": L,
        "model.overrides.num_attention_heads": H, "model.overrides.attention": "mha",
        "model.overrides.q_lora_rank": None, "model.overrides.qk_nope_head_dim": dk // 2,
        "model.overrides.qk_rope_head_dim": dk // 2, "model.overrides.v_head_dim": dk,
        "model.overrides.intermediate_size": round(8 * d / 3), "model.overrides.first_k_dense_replace": L,
        "data.batch_size": p["batch"],
        "train.optim.peak_lr": lr, "train.optim.warmup_steps": warm,
        "train.optim.constant_steps": s80 - warm, "train.optim.cosine_steps": 0,
        "train.optim.final_stages": [(s90 - s80, lr * 0.316), (steps - s90, lr * 0.1)],
        "loop.eval_every": max(1, steps // 4), "loop.eval_batches": 0, "loop.ckpt_every": max(1, steps // 2),
    }


ARMS = {arm: _arm(arm) for arm in SIZES}
COMPUTE = {arm: arm_plan(arm)["C_trained"] for arm in SIZES}  # read by experiments/sweep.py for the power-law fit
CLAIMS = [
    dict(id="loss_vs_compute_power_law", metric="loss", expect="power_law",
         claim="Validation loss falls as a power law in compute, L = a C^-b (fitted exponent b)",
         paper="DeepSeek LLM §3 fits eta_opt, B_opt, M_opt, D_opt as power laws of C (1e17-3e20 FLOPs); its "
               "loss-vs-compute exponent is not transcribed in docs/paper_numbers.md"),
]


def get_config(arg="s1"):
    return base.experiment_config(EXPERIMENT, ARMS, arg)
