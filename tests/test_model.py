"""Transformer wiring: per-layer reference for the scanned stacks, MTP composition, causality, cache decoding,
remat, bad token ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config, generate, model
from deepseek_jax.layers.linear import linear
from deepseek_jax.model import Block, Transformer

CFG = config.preset("tiny", initializer_range=0.1)
B, T = 2, 10


@pytest.fixture(scope="module")
def tiny():
    variables = model.init(CFG, jax.random.PRNGKey(0), seq_len=T)
    # a non-zero router bias, so the bias plumbing is exercised
    variables["router"] = jax.tree_util.tree_map(
        lambda b: jax.random.uniform(jax.random.PRNGKey(3), b.shape, minval=-0.2, maxval=0.2), variables["router"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, CFG.vocab_size)
    out = jax.jit(Transformer(CFG).apply)(variables, tokens)
    return variables, tokens, out


def _rms(x, w, eps):
    return w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _layer(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def test_layer_by_layer_reference(tiny):
    """Scanned stacks == applying each HF-numbered layer's Block by hand, with its own slice of the stack."""
    variables, tokens, out = tiny
    p, r = variables["params"], variables["router"]
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    x = p["embed"]["embedding"][tokens]
    loads = []
    for i in range(CFG.num_hidden_layers):
        moe = CFG.is_moe_layer(i)
        j = i - CFG.first_k_dense_replace if moe else i
        v = {"params": _layer(p["moe_layers" if moe else "dense_layers"], j)}
        if moe:
            v["router"] = _layer(r["moe_layers"], j)
        x, (aux, _) = Block(CFG, moe=moe).apply(v, x, pos)
        if moe:
            loads.append(aux["load"])
    hidden = _rms(x, p["final_norm"]["scale"], CFG.rms_norm_eps)
    logits = hidden @ p["lm_head"]["kernel"]
    assert np.abs(np.asarray(logits)).max() > 0.1
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.aux["moe"]["load"]), np.stack(loads))
    assert out.aux["moe"]["load"].sum() == CFG.num_moe_layers * B * T * CFG.num_experts_per_tok


def test_mtp_composition(tiny):
    """mtp_logits[0][:, i] = head(norm(Block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])))), h = final hidden."""
    variables, tokens, out = tiny
    p, r = variables["params"], variables["router"]
    m = p["mtp_0"]
    eps = CFG.rms_norm_eps
    e = _rms(p["embed"]["embedding"][tokens[:, 1:]], m["enorm"]["scale"], eps)
    h = _rms(out.hidden[:, :-1], m["hnorm"]["scale"], eps)
    x = linear(jnp.concatenate([e, h], -1), m["eh_proj"]["kernel"])
    pos = jnp.broadcast_to(jnp.arange(T - 1)[None], (B, T - 1))
    x, _ = Block(CFG, moe=True).apply({"params": m["block"], "router": r["mtp_0"]["block"]}, x, pos)
    logits = _rms(x, m["head_norm"]["scale"], eps) @ p["lm_head"]["kernel"]
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (B, T - 1, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0]), np.asarray(logits), rtol=1e-5, atol=1e-5)
    assert out.aux["mtp"]["load"].shape == (1, CFG.n_routed_experts)


def test_causality(tiny):
    variables, tokens, out = tiny
    k = 6
    changed = tokens.at[:, k].set((tokens[:, k] + 1) % CFG.vocab_size)
    out2 = jax.jit(Transformer(CFG).apply)(variables, changed)
    np.testing.assert_allclose(np.asarray(out2.logits[:, :k]), np.asarray(out.logits[:, :k]), atol=1e-5)
    assert not np.allclose(np.asarray(out2.logits[:, k]), np.asarray(out.logits[:, k]))
    # MTP position i sees tokens <= i+1.
    np.testing.assert_allclose(np.asarray(out2.mtp_logits[0][:, :k - 1]), np.asarray(out.mtp_logits[0][:, :k - 1]),
                               atol=1e-5)


def test_cached_decoding_equals_full_forward(tiny):
    variables, tokens, out = tiny
    net = Transformer(CFG)
    cache = generate.init_cache(CFG, B, 16)
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    step = jax.jit(net.apply)
    res = step(variables, tokens[:, :4], pos[:, :4], cache)
    logits, cache = [res.logits], res.cache
    assert res.mtp_logits == ()
    for t in range(4, T):
        res = step(variables, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        logits.append(res.logits)
        cache = res.cache
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), np.asarray(out.logits), rtol=1e-5, atol=1e-5)


def test_unstacked_layers_same_function(tiny):
    """Transformer(stacked=False) on unstack_layers(variables) (one Block per layer, generate.py's decode path):
    the same logits, loads and MTP logits as the scanned model (itself checked layer by layer above), and the same
    latent cache, as per-layer slices of the stacked one, when decoding."""
    variables, tokens, out = tiny
    uvars = model.unstack_layers(variables, CFG)
    assert "moe_layers" not in uvars["params"] and "moe_layers_0" in uvars["router"]
    np.testing.assert_array_equal(np.asarray(uvars["params"][f"moe_layers_{CFG.num_moe_layers - 1}"]["mlp"]
                                             ["experts_down"]),
                                  np.asarray(variables["params"]["moe_layers"]["mlp"]["experts_down"][-1]))
    u = jax.jit(Transformer(CFG, stacked=False).apply)(uvars, tokens)
    np.testing.assert_allclose(np.asarray(u.logits), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(u.aux["moe"]["load"]), np.asarray(out.aux["moe"]["load"]))
    np.testing.assert_allclose(np.asarray(u.mtp_logits[0]), np.asarray(out.mtp_logits[0]), rtol=1e-5, atol=1e-5)
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    cache = generate.init_cache(CFG, B, 16)
    s = jax.jit(Transformer(CFG).apply)(variables, tokens[:, :6], pos[:, :6], cache)
    su = jax.jit(Transformer(CFG, stacked=False).apply)(uvars, tokens[:, :6], pos[:, :6], model.unstack_cache(cache))
    for kind in s.cache:
        for i, layer in enumerate(su.cache[kind]):
            for name, a in layer.items():
                np.testing.assert_allclose(np.asarray(a), np.asarray(s.cache[kind][name][i]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(su.logits), np.asarray(out.logits[:, :6]), rtol=1e-5, atol=1e-5)


def _loss(variables, tokens, cfg):
    def loss(params):
        o = Transformer(cfg).apply({"params": params, "router": variables["router"]}, tokens)
        return jnp.mean(o.logits ** 2) + jnp.mean(o.mtp_logits[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.fixture(scope="module")
def grads_no_remat(tiny):
    variables, tokens, _ = tiny
    return _loss(variables, tokens, CFG)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_gradients(tiny, grads_no_remat, policy):
    variables, tokens, _ = tiny
    base = grads_no_remat
    rem = _loss(variables, tokens, CFG.replace(remat_policy=policy))
    np.testing.assert_allclose(float(rem[0]), float(base[0]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(rem[1]), jax.tree_util.tree_leaves(base[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_remat_policy_covers_the_mtp_block(tiny):
    """The scanned stacks remat inside their scan bodies; the MTP module's block must be rematerialised too (one
    top-level remat in the loss's jaxpr), else its activations stay live at paper scale."""
    variables, tokens, _ = tiny

    def top_level_remats(cfg):
        def loss(params):
            o = Transformer(cfg).apply({"params": params, "router": variables["router"]}, tokens)
            return jnp.mean(o.logits ** 2) + jnp.mean(o.mtp_logits[0] ** 2)
        eqns = jax.make_jaxpr(loss)(variables["params"]).jaxpr.eqns
        return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqns)

    assert top_level_remats(CFG) == 0
    assert top_level_remats(CFG.replace(remat_policy="full")) == CFG.num_nextn_predict_layers == 1


def test_out_of_vocabulary_tokens_raise(tiny):
    variables, tokens, _ = tiny
    net = Transformer(CFG)
    with pytest.raises(ValueError, match=r"tokens: ids must be in \[0, vocab_size=512\)"):
        net.apply(variables, tokens.at[0, 3].set(CFG.vocab_size))
    with pytest.raises(ValueError, match="out of range"):
        net.apply(variables, tokens.at[1, 0].set(-1))
    with pytest.raises(ValueError, match="integer token ids"):
        net.apply(variables, tokens.astype(jnp.float32))


def test_out_of_vocabulary_under_jit_poisons_not_clamps(tiny):
    """Inside jit the ids are not visible to Python; the lookup fills NaN rather than clamping to a real row."""
    variables, tokens, _ = tiny
    out = jax.jit(Transformer(CFG).apply)(variables, tokens.at[0, 3].set(CFG.vocab_size + 7))
    assert np.isnan(np.asarray(out.logits[0, 3:])).all()
    assert np.isfinite(np.asarray(out.logits[1])).all()


def test_bf16_compute_runs_and_tracks_fp32(tiny):
    variables, tokens, out = tiny
    o16 = jax.jit(Transformer(CFG.replace(dtype="bfloat16")).apply)(variables, tokens)
    assert o16.logits.dtype == jnp.bfloat16
    # Not a parity check: bf16 flips some routing decisions (REFERENCE.md), which moves those tokens' logits a
    # lot. Most positions must still agree closely.
    a, b = np.asarray(out.logits), np.asarray(o16.logits, np.float32)
    per_pos = np.sqrt(np.mean((a - b) ** 2, -1) / np.mean(a ** 2, -1))
    assert np.isfinite(b).all() and np.median(per_pos) < 0.05, per_pos


def test_greedy_generate_equals_argmax_of_full_forward(tiny):
    """Each greedily generated token is the argmax of a full (uncached, naive) forward over the sequence so far."""
    variables, tokens, _ = tiny
    prompt = np.asarray(tokens[0, :5])
    new = generate.generate(CFG, variables, prompt, max_new_tokens=4)
    seq = list(prompt)
    fwd = jax.jit(Transformer(CFG).apply)
    for t in new:
        logits = fwd(variables, jnp.asarray([seq + [0] * (9 - len(seq))]))  # fixed shape; causal => padding unseen
        assert int(jnp.argmax(logits.logits[0, len(seq) - 1])) == int(t)
        seq.append(int(t))
    with pytest.raises(ValueError, match="empty prompt"):
        generate.generate(CFG, variables, [], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        generate.generate(CFG, variables, [CFG.vocab_size], 3)


def test_negative_id_under_jit_poisons_never_wraps(tiny):
    """jnp.take(mode="fill") wraps -1 to V-1 before its bounds check: id -1 used to read token V-1's embedding.
    Now -1 (and -V) poison their position like any other out-of-range id."""
    variables, tokens, _ = tiny
    f = jax.jit(Transformer(CFG).apply)
    V = CFG.vocab_size
    wrapped = np.asarray(f(variables, tokens.at[0, 3].set(V - 1)).logits)
    for bad in (-1, -V):
        out = np.asarray(f(variables, tokens.at[0, 3].set(bad)).logits)
        assert np.isnan(out[0, 3:]).all() and np.isfinite(out[1]).all()
        assert not np.allclose(np.nan_to_num(out[0, 3]), wrapped[0, 3])


def test_positions_beyond_max_position_embeddings_are_refused(tiny):
    variables, tokens, _ = tiny
    short = CFG.replace(max_position_embeddings=T - 2)
    with pytest.raises(ValueError, match=r"sequence length 10 exceeds max_position_embeddings=8"):
        Transformer(short).apply(variables, tokens)
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    with pytest.raises(ValueError, match=r"positions: must be in \[0, max_position_embeddings=8\)"):
        Transformer(short).apply(variables, tokens, pos)
    # traced positions cannot raise: the out-of-range ones are poisoned
    out = np.asarray(jax.jit(Transformer(short).apply)(variables, tokens, pos).logits)
    assert np.isnan(out[:, T - 2:]).all()
