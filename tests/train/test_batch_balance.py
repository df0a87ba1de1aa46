"""Batch-wise balance loss (V3 §4.5.3): a hand-computed value, its relation to the sequence-wise term, and the
train step's ``balance.scope = "batch"`` against a direct forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config
from deepseek_jax.model import Transformer
from deepseek_jax.train import losses
from deepseek_jax.train.step import default_train_config, init_train_state, make_train_step, validate_train_config

from testing_utils import random_variables

# Two layers (dense + MoE) plus MTP: the smallest model that has both kinds of balance terms (compiles fast).
SMALL = config.preset("tiny", moe_dispatch="dense", num_hidden_layers=2, rope_scaling=None)
SEQ = 8


def test_batch_terms_hand_values():
    # E = 4 experts, K = 1, T = 2 tokens, B = 2 sequences, one layer. Sequence 0 sends both tokens to expert 0,
    # sequence 1 both to expert 1; P (mean normalized scores) mirrors that.
    counts = jnp.array([[[2, 0, 0, 0], [0, 2, 0, 0]]], jnp.float32)
    probs = jnp.array([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]])
    # batch: f = 4/(1*2*2) * (2, 2, 0, 0) = (2, 2, 0, 0); P = (0.4, 0.4, 0.1, 0.1): sum f P = 0.8 + 0.8 = 1.6
    np.testing.assert_allclose(np.asarray(losses.batch_balance_terms(counts, probs, 1, 2)), [1.6], rtol=1e-6)
    # sequence-wise: seq 0: f = (4, 0, 0, 0), P_0 = 0.7 -> 2.8; seq 1 alike -> mean 2.8 > 1.6: the sequence-wise
    # term punishes the within-sequence skew that the batch-wise one lets balance out across sequences.
    np.testing.assert_allclose(np.asarray(losses.sequence_balance_terms(counts, probs, 1, 2)), [[2.8, 2.8]],
                               rtol=1e-6)
    # one sequence: the two coincide
    np.testing.assert_allclose(np.asarray(losses.batch_balance_terms(counts[:, :1], probs[:, :1], 1, 2)), [2.8],
                               rtol=1e-6)


def _variables(cfg):
    """Variables from the model's own shapes (eval_shape) filled with N(0, 0.02) draws, router bias 0, norm gains
    1: as tests/train/conftest.py, without model.init's ~10 s compile."""
    return random_variables(cfg, SEQ)


def test_train_step_batch_scope_matches_forward():
    tc = default_train_config(10, peak_lr=1e-3, warmup_steps=1)
    tc.balance.scope = "batch"
    tc.balance.alpha = 0.01
    tc.mtp.lambda_ = 0.0
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, SEQ + 1), 0, SMALL.vocab_size)
    variables = _variables(SMALL)
    state = init_train_state(SMALL, tc, None, variables=variables)
    _, m = jax.jit(make_train_step(SMALL, tc))(state, {"tokens": tokens})
    out = jax.jit(Transformer(SMALL).apply)(variables, tokens[:, :-1])
    K = SMALL.num_experts_per_tok
    terms = [losses.batch_balance_terms(out.aux["moe"]["seq_counts"], out.aux["moe"]["seq_probs"], K, SEQ)]
    terms.append(losses.batch_balance_terms(out.aux["mtp"]["seq_counts"], out.aux["mtp"]["seq_probs"], K, SEQ - 1))
    want = 0.01 * float(jnp.concatenate(terms).mean())
    np.testing.assert_allclose(float(m["balance_loss"]), want, rtol=1e-5)


def test_bad_scope_names_field():
    tc = default_train_config(10)
    tc.balance.scope = "token"
    try:
        validate_train_config(tc)
    except ValueError as e:
        assert "balance.scope" in str(e)
    else:
        raise AssertionError("balance.scope='token' was accepted")
