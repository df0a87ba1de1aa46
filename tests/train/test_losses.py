"""Each loss term against a closed-form hand computation."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.train import losses


def test_cross_entropy_hand_values():
    # uniform logits: CE = log V per token
    s, c = losses.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32))
    assert float(c) == 6
    np.testing.assert_allclose(float(s), 6 * math.log(5), rtol=1e-6)
    # two classes, logits (0, ln 3): p(1) = 3/4 -> CE = ln(4/3); p(0) = 1/4 -> CE = ln 4
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    s, c = losses.cross_entropy(logits, jnp.array([[1, 0]]))
    np.testing.assert_allclose(float(s), math.log(4 / 3) + math.log(4), rtol=1e-6)


def test_cross_entropy_mask_fp32_and_nonfinite_masked():
    logits = jnp.array([[[0.0, math.log(3.0)], [jnp.nan, jnp.inf]]], jnp.bfloat16)
    s, c = losses.cross_entropy(logits, jnp.array([[1, 0]]), jnp.array([[1, 0]]))
    assert s.dtype == jnp.float32 and float(c) == 1
    # ln 3 rounds in bf16; the log-softmax itself runs in fp32
    l3 = float(jnp.asarray(math.log(3.0), jnp.bfloat16))
    np.testing.assert_allclose(float(s), math.log(1 + math.exp(l3)) - l3, rtol=1e-6)


def _peaked(targets, V, c):
    return c * jnp.eye(V)[targets]  # logit c on the given token, 0 elsewhere: CE = log(e^c + V - 1) - c


def test_mtp_loss_alignment_and_mask():
    """Depth k at position i predicts tokens[:, i+k+1]; its mask is mask[:, k:]."""
    V, c, lam = 7, 3.0, 0.3
    tokens = jnp.array([[1, 2, 3, 4, 5, 6, 0], [6, 5, 4, 3, 2, 1, 0]])  # [B, T+1], T = 6
    T = tokens.shape[1] - 1
    ce_right = math.log(math.exp(c) + V - 1) - c
    # D = 2, each depth peaked on its correct targets
    mtp = tuple(_peaked(tokens[:, k + 1:], V, c) for k in (1, 2))
    assert [m.shape[1] for m in mtp] == [T - 1, T - 2]
    np.testing.assert_allclose(float(losses.mtp_loss(mtp, tokens, None, lam)), lam / 2 * 2 * ce_right, rtol=1e-6)
    # off by one (the main head's targets) costs more
    wrong = (_peaked(tokens[:, 1:T], V, c),)
    assert float(losses.mtp_loss(wrong, tokens, None, lam)) > 2 * lam * ce_right
    # masking: depth 1's last target (tokens[:, T], mask[:, T-1]) made wrong and masked -> unchanged loss
    mask = jnp.ones((2, T)).at[:, T - 1].set(0)
    logits = _peaked(tokens[:, 2:], V, c).at[:, -1].set(_peaked(jnp.zeros((2,), jnp.int32) + 3, V, 50.0))
    np.testing.assert_allclose(float(losses.mtp_loss((logits,), tokens, mask, lam)), lam * ce_right, rtol=1e-6)
    assert float(losses.mtp_loss((logits,), tokens, None, lam)) > lam * ce_right + 1.0
    assert float(losses.mtp_loss((), tokens, None, lam)) == 0.0


def test_sequence_balance_loss_closed_forms():
    E, K, T, alpha = 4, 2, 6, 1e-4
    # perfectly uniform routing: every expert gets K*T/E tokens, P_i = 1/E -> f_i = 1, sum_i f_i P_i = 1
    counts = jnp.full((3, 2, E), K * T / E)
    probs = jnp.full((3, 2, E), 1 / E)
    np.testing.assert_allclose(float(losses.sequence_balance_loss(counts, probs, K, T, alpha)), alpha, rtol=1e-6)
    # collapse: all T tokens on experts 0 and 1, scores split 1/2, 1/2 -> f = E/K on them, sum = E/K
    counts = jnp.array([T, T, 0, 0], jnp.float32)[None, None]
    probs = jnp.array([0.5, 0.5, 0, 0])[None, None]
    np.testing.assert_allclose(float(losses.sequence_balance_loss(counts, probs, K, T, alpha)), alpha * E / K,
                               rtol=1e-6)
    # small hand example, K = 1, T = 2: counts (2, 0, 0, 0), P = (0.7, 0.1, 0.1, 0.1): f = (4, 0, 0, 0) -> 2.8;
    # a second layer uniform (1.0): mean over layers = 1.9
    counts = jnp.array([[[2, 0, 0, 0]], [[0.5, 0.5, 0.5, 0.5]]], jnp.float32)
    probs = jnp.array([[[0.7, 0.1, 0.1, 0.1]], [[0.25] * 4]])
    np.testing.assert_allclose(np.asarray(losses.sequence_balance_terms(counts, probs, 1, 2)), [[2.8], [1.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(float(losses.sequence_balance_loss(counts, probs, 1, 2, 0.5)), 0.5 * 1.9, rtol=1e-6)


def test_max_vio():
    load = jnp.array([[4, 4, 4, 4], [8, 4, 2, 2]], jnp.float32)  # layer 0: 0; layer 1: (8 - 4) / 4 = 1
    np.testing.assert_allclose(np.asarray(losses.max_vio(load, per_layer=True)), [0.0, 1.0])
    assert float(losses.max_vio(load)) == pytest.approx(0.5)
    assert float(losses.max_vio(load / load.sum(-1, keepdims=True))) == pytest.approx(0.5)  # scale-free
    assert float(losses.max_vio(jnp.zeros((1, 4)))) == 0.0
