"""Training losses and balance statistics, all in fp32 whatever the compute dtype (V3 §3.3 keeps losses in high
precision).

Token convention (the data pipeline's batch and the model's ModelOutput):
  tokens [B, T+1]; the model reads inputs = tokens[:, :T]; the main head at position i predicts tokens[:, i+1]
  (targets = tokens[:, 1:]); MTP depth k (1-based) at position i = 0..T-k-1 predicts input token i+k+1 =
  tokens[:, i+k+1], so its targets are tokens[:, k+1:] ([B, T-k]) and, with ``mask`` [B, T] marking valid
  targets of the main head (mask[:, j] <-> tokens[:, j+1]), its mask is mask[:, k:].
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None
                  ) -> Tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of tokens it sums over: (sum_loss, count), fp32 scalars.

    logits [..., V] (any float dtype; upcast to fp32 before the log-softmax), targets [...] int, mask [...]
    (1 = count this target; None = all). Masked positions contribute exactly 0 even when their logits are not
    finite. Mean CE = sum_loss / count; keeping the two apart lets gradient accumulation normalise by the count
    of the whole global batch."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - picked
    if mask is None:
        return nll.sum(), jnp.asarray(nll.size, jnp.float32)
    m = mask.astype(jnp.float32)
    return jnp.where(m > 0, nll * m, 0.0).sum(), m.sum()


def mtp_targets(tokens: jax.Array, mask: Optional[jax.Array], k: int) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Targets [B, T-k] and mask [B, T-k] of MTP depth k (1-based) from the batch tokens [B, T+1] and target mask
    [B, T]: tokens[:, k+1:] and mask[:, k:] (see the module docstring)."""
    return tokens[:, k + 1:], (None if mask is None else mask[:, k:])


def mtp_loss(mtp_logits: Sequence[jax.Array], tokens: jax.Array, mask: Optional[jax.Array], lam,
             counts: Optional[jax.Array] = None) -> jax.Array:
    """L_MTP = (lambda / D) * sum_{k=1..D} CE_k (V3 eq. 25), CE_k the mean over depth k's valid targets.

    mtp_logits: the model's tuple, the k-th [B, T-k, V]; tokens: the batch tokens [B, T+1]; mask [B, T] or None.
    ``counts`` [D]: the number of valid targets CE_k is averaged over (default: those of this batch; under
    gradient accumulation, those of the whole global batch, so micro-batch losses add up to the global one).
    0 when D = 0."""
    D = len(mtp_logits)
    if D == 0:
        return jnp.zeros([], jnp.float32)
    total = jnp.zeros([], jnp.float32)
    for k, logits in enumerate(mtp_logits, start=1):
        tgt, m = mtp_targets(tokens, mask, k)
        s, c = cross_entropy(logits, tgt, m)
        total = total + s / jnp.maximum(c if counts is None else counts[k - 1], 1.0)
    return jnp.asarray(lam, jnp.float32) / D * total


def sequence_balance_terms(seq_counts: jax.Array, seq_probs: jax.Array, K: int, T: int) -> jax.Array:
    """sum_i f_i P_i for every (layer, sequence): [L, B] (V3 eqs. 18-20, without alpha).

    f_i = N_r / (K_r T) * (tokens of the sequence routed to expert i)  (eq. 18; N_r = E experts, K_r = K per token)
    P_i = mean over the sequence's tokens of s_i / sum_j s_j           (eq. 19-20; the model's seq_probs)
    Under perfectly uniform routing f_i = 1 and the term is sum_i P_i = 1; if every token picks the same K experts
    and puts all its score on them, it is E / K. The counts come from a top-k (no gradient); the gradient flows
    through P, i.e. the router kernel."""
    E = seq_counts.shape[-1]
    f = (E / (K * T)) * seq_counts.astype(jnp.float32)
    return (f * seq_probs.astype(jnp.float32)).sum(-1)


def sequence_balance_loss(seq_counts: jax.Array, seq_probs: jax.Array, K: int, T: int, alpha,
                          n_sequences=None) -> jax.Array:
    """Sequence-wise balance loss alpha * sum_i f_i P_i (V3 eq. 17), averaged over MoE layers and sequences
    (the paper defines it per sequence and per layer; it does not say how they combine: we take the mean, so
    alpha keeps its meaning whatever the depth and batch). seq_counts, seq_probs [L, B, E]; T tokens per
    sequence. ``n_sequences``: the sequence count of the mean (default B; under gradient accumulation, the global
    batch's). Uniform routing gives exactly alpha."""
    terms_lb = sequence_balance_terms(seq_counts, seq_probs, K, T)
    n = terms_lb.shape[-1] if n_sequences is None else n_sequences
    return jnp.asarray(alpha, jnp.float32) * terms_lb.sum() / (terms_lb.shape[0] * n)


def batch_balance_terms(seq_counts: jax.Array, seq_probs: jax.Array, K: int, T: int) -> jax.Array:
    """The batch-wise variant of eqs. 18-20 (V3 §4.5.3, "batch-wise auxiliary loss"): sum_i f_i P_i per layer with
    f_i and P_i taken over all the batch's tokens instead of one sequence's: [L].

    f_i = N_r / (K_r B T) * (tokens of the whole batch routed to i);  P_i = mean over the batch's B*T tokens of
    s_i / sum_j s_j = mean over sequences of seq_probs (every sequence has T tokens). seq_counts, seq_probs
    [L, B, E]. Uniform routing gives 1, as for the sequence-wise term; a batch whose sequences are each skewed but
    skewed towards different experts is penalised by the sequence-wise term and not by this one."""
    B, E = seq_counts.shape[-2], seq_counts.shape[-1]
    f = (E / (K * B * T)) * seq_counts.astype(jnp.float32).sum(-2)
    return (f * seq_probs.astype(jnp.float32).mean(-2)).sum(-1)


def batch_balance_loss(seq_counts: jax.Array, seq_probs: jax.Array, K: int, T: int, alpha,
                       n_sequences=None) -> jax.Array:
    """The batch-wise balance loss (V3 §4.5.3): alpha * the mean over MoE layers of ``batch_balance_terms``.
    ``n_sequences`` (default B): under gradient accumulation the global batch's sequence count, so each
    micro-batch's term is weighted by its share of the sequences and the micro-batch losses average."""
    terms_l = batch_balance_terms(seq_counts, seq_probs, K, T)
    b = seq_counts.shape[-2]
    n = b if n_sequences is None else n_sequences
    return jnp.asarray(alpha, jnp.float32) * (terms_l * b).sum() / (terms_l.shape[0] * n)


def max_vio(load: jax.Array, per_layer: bool = False) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load (LF paper), per layer for load [L, E], then averaged over
    layers (``per_layer=True``: the [L] values). Scale-free: counts or fractions give the same value. A layer with
    no load at all gives 0 (not NaN)."""
    load = jnp.asarray(load, jnp.float32)
    mean = load.mean(-1)
    v = jnp.where(mean > 0, (load.max(-1) - mean) / jnp.where(mean > 0, mean, 1.0), 0.0)
    return v if per_layer else v.mean()
