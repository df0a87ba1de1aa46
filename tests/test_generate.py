"""generate.py: the latent cache, batched decoding, sampling, MTP self-speculative decoding, the command line.

References are independent of the code under test: full uncached forwards (naive MLA, MTP logits from the
training-time forward), closed-form sampling distributions, the cache's arrays themselves. (tests/test_model.py
holds the Transformer-level cache test and a one-prompt greedy check.)
"""

from __future__ import annotations


import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config, generate, model
from deepseek_jax.model import Transformer

CFG = config.preset("tiny", initializer_range=0.1)
FULL_LEN = 24  # fixed length of the reference forwards (one compile); causal, so the tail padding is unseen
PROMPTS = [np.arange(2, 7), np.array([300, 301]), np.arange(20, 29)]  # lengths 5, 2, 9
# Every decode below uses N new tokens and max_len MAX_LEN, so the tests share a few compiled programs.
N, MAX_LEN = 8, 15


def _greedy(variables, prompts, eos_id=None):
    """generate_batch (greedy) with the shared settings -> (tokens, logits) per prompt."""
    return generate.generate_batch(CFG, variables, prompts, N, eos_id=eos_id, max_len=MAX_LEN, return_logits=True)


@pytest.fixture(scope="module")
def tiny():
    v = model.init(CFG, jax.random.PRNGKey(0), seq_len=8)
    v["router"] = jax.tree_util.tree_map(
        lambda b: jax.random.uniform(jax.random.PRNGKey(3), b.shape, minval=-0.2, maxval=0.2), v["router"])
    return v


@pytest.fixture(scope="module")
def full_forward():
    f = jax.jit(Transformer(CFG).apply)

    def run(variables, seq):
        seq = np.asarray(seq)
        assert len(seq) <= FULL_LEN
        out = f(variables, jnp.asarray(np.pad(seq, (0, FULL_LEN - len(seq)))[None]))
        return np.asarray(out.logits[0]), np.asarray(out.mtp_logits[0][0])

    return run


@pytest.fixture(scope="module")
def predictable(tiny):
    """A model whose MTP module mostly agrees with it, so drafts get accepted (a random MTP module never is):
    blocks scaled down to small residual updates, so the main model is nearly a bigram model
    t -> argmax head(norm(emb(t))); the MTP projection passes the next token's normed embedding through, so the
    module predicts the bigram successor of t_{i+1}, which is what the main model predicts at i+1."""
    def shrink(path, a):  # every block's output projections (attention, dense FFN, experts) x 0.02
        names = [getattr(k, "key", None) for k in path]
        return a * 0.02 if {"o_proj", "down_proj", "experts_down"} & set(names) else a

    p = jax.tree_util.tree_map_with_path(shrink, tiny["params"])
    d = CFG.hidden_size
    p["mtp_0"]["eh_proj"]["kernel"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0)
    return {"params": p, "router": tiny["router"]}


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token_per_layer(dtype):
    item = jnp.dtype(dtype).itemsize
    for cfg in (CFG, config.preset("deepseek-v3-671b")):
        cache = jax.eval_shape(lambda: generate.init_cache(cfg, 3, 16, dtype))
        expect = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * item
        assert generate.cache_bytes_per_token_per_layer(cache) == expect
        # every array is [layers, batch, slots, features]; nothing else is cached
        n = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(cache))
        assert n == cfg.num_hidden_layers * 3 * 16 * expect
    assert (config.preset("deepseek-v3-671b").kv_lora_rank + config.preset("deepseek-v3-671b").qk_rope_head_dim
            == 576)
    mtp = jax.eval_shape(lambda: generate.init_mtp_cache(CFG, 2, 8, dtype))
    assert generate.cache_bytes_per_token_per_layer(mtp) == (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * item


def test_gather_dispatch_equals_dense():
    """The decode-step MoE dispatch (moe_dispatch.dispatch_gather) computes the same function as the dense reference."""
    from deepseek_jax.ops import moe_dispatch

    ks = jax.random.split(jax.random.PRNGKey(5), 5)
    N, K, E, d, F = 3, 2, 8, 16, 12
    x = jax.random.normal(ks[0], (N, d))
    idx = jnp.array([[4, 1], [4, 3], [7, 4]])  # expert 4 serves every token
    w = jax.random.uniform(ks[2], (N, K))
    wg, wu = jax.random.normal(ks[3], (2, E, d, F)) * 0.3
    wd = jax.random.normal(ks[4], (E, F, d)) * 0.3
    ref = jax.jit(moe_dispatch.dispatch_dense)(x, idx, w, wg, wu, wd)
    got = jax.jit(moe_dispatch.dispatch_gather)(x, idx, w, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(ref)).max() > 0.1


# --------------------------------------------------------------------------------------------------------------
# Plain decoding
# --------------------------------------------------------------------------------------------------------------
def test_batched_decode_logits_equal_full_forward(tiny, full_forward):
    """Prompts of lengths 5, 2, 9 in one batch (naive prefill, absorbed decode steps): the logits every new
    token was chosen from equal a full uncached forward over the sequence so far (fp32, 1e-5), at every step,
    and greedy picks their argmax."""
    new, logits = _greedy(tiny, PROMPTS)
    for p, n, lg in zip(PROMPTS, new, logits):
        k = min(N, MAX_LEN - len(p))
        assert len(n) == k and lg.shape == (k, CFG.vocab_size)
        ref, _ = full_forward(tiny, np.concatenate([p, n]))
        ref = ref[len(p) - 1:len(p) - 1 + k]
        assert np.abs(ref).max() > 0.5
        np.testing.assert_allclose(lg, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(n, ref.argmax(-1))


def test_mixed_lengths_equal_one_by_one_with_stopping(tiny):
    """Batched == one prompt at a time, token for token, with per-row EOS and max_len stops (row 2, 9 prompt
    tokens, may reach only MAX_LEN - 9 = 6 new tokens)."""
    first, _ = _greedy(tiny, PROMPTS)
    eos = int(first[0][3])  # row 0 stops at its 4th token (and any other row that emits it)
    batched, _ = _greedy(tiny, PROMPTS, eos_id=eos)
    assert len(batched[0]) <= 4 and batched[0][-1] == eos
    assert len(batched[2]) <= MAX_LEN - 9
    for p, b, full in zip(PROMPTS, batched, first):
        one, _ = _greedy(tiny, [p], eos_id=eos)
        np.testing.assert_array_equal(b, one[0])
        # and both are the continuation without EOS, cut at its first EOS
        cut = int(np.argmax(full == eos)) + 1 if (full == eos).any() else len(full)
        np.testing.assert_array_equal(b, full[:cut])
        alone, _ = _greedy(tiny, [p])
        np.testing.assert_array_equal(alone[0], full)


def test_no_retrace_for_new_prompts_of_the_same_shape(tiny):
    """One compiled program serves every call with the same shapes and settings (the decode loop is inside it)."""
    if not hasattr(generate._decode, "_cache_size"):  # private jax API; present in jax 0.10
        pytest.skip("jax.jit(...)._cache_size is not available in this jax version")
    _greedy(tiny, PROMPTS)
    before = generate._decode._cache_size()
    _greedy(tiny, [p[::-1] + 100 for p in PROMPTS[::-1]])
    _greedy(tiny, [[1, 2, 3, 4], [5], [6, 7]])
    assert generate._decode._cache_size() == before


def test_sampling_distributions():
    """sample_logits against closed forms: temperature-scaled softmax restricted to the top-k / nucleus set."""
    logits = jnp.asarray(np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15])), jnp.float32)
    n = 40000
    batch = jnp.broadcast_to(logits, (n, 5))

    def freqs(**kw):
        s = np.asarray(generate.sample_logits(batch, jax.random.PRNGKey(7), **kw))
        return np.bincount(s, minlength=5) / n

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    lg = np.asarray(logits, np.float64)
    np.testing.assert_array_equal(np.asarray(generate.sample_logits(batch[:3], jax.random.PRNGKey(0))), [1, 1, 1])
    tol = 4 * np.sqrt(0.25 / n)  # 4 standard errors
    np.testing.assert_allclose(freqs(temperature=1.0), softmax(lg), atol=tol)
    np.testing.assert_allclose(freqs(temperature=0.5), softmax(lg / 0.5), atol=tol)
    top3 = np.where(np.isin(np.arange(5), [1, 3, 4]), lg, -np.inf)
    np.testing.assert_allclose(freqs(temperature=1.0, top_k=3), softmax(top3), atol=tol)
    # nucleus 0.75: sorted probs .4, .3, .15, ...; mass before .15 is .7 < .75, before .1 is .85 -> keep {1, 3, 4}
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.75), softmax(top3), atol=tol)
    # nucleus 0.7: mass before .15 is exactly 0.7, not < 0.7 -> keep {1, 3}
    np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.69),
                               softmax(np.where(np.isin(np.arange(5), [1, 3]), lg, -np.inf)), atol=tol)
    np.testing.assert_array_equal(freqs(temperature=2.0, top_k=1), [0, 1, 0, 0, 0])


def test_sampled_generation_stays_in_top_k(tiny):
    new, logits = generate.generate_batch(CFG, tiny, PROMPTS, N, temperature=1.0, top_k=3, seed=1,
                                          max_len=MAX_LEN, return_logits=True)
    for n, lg in zip(new, logits):
        top3 = np.argsort(-lg, -1)[:, :3]
        assert all(t in row for t, row in zip(n, top3))


def test_bad_input_raises(tiny):
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        generate.generate_batch(CFG, tiny, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="prompt 0: 6 tokens, but max_len=6"):
        generate.generate_batch(CFG, tiny, [[1] * 6], 3, max_len=6)
    with pytest.raises(ValueError, match=r"prompt 1: tokens: ids must be in \[0, vocab_size=512\)"):
        generate.generate_batch(CFG, tiny, [[1, 2], [3, 512]], 3)
    with pytest.raises(ValueError, match="prompt 0: tokens: ids must be in"):
        generate.generate(CFG, tiny, [-1, 4], 3)
    with pytest.raises(ValueError, match="integer token ids"):
        generate.generate(CFG, tiny, [1.5, 2.0], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate.generate(CFG, tiny, [1, 2], 0)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=1024"):
        generate.generate(CFG, tiny, [1, 2], 1023)
    with pytest.raises(ValueError, match=r"eos_id must be None or an int in \[0, vocab_size=512\)"):
        generate.generate(CFG, tiny, [1, 2], 3, eos_id=512)
    with pytest.raises(ValueError, match="no prompts"):
        generate.generate_batch(CFG, tiny, [], 3)
    with pytest.raises(ValueError, match="got text"):
        generate.generate_batch(CFG, tiny, "hello", 3)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate.generate(CFG, tiny, [1, 2], 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        generate.generate(CFG, tiny, [1, 2], 3, temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="temperature must be"):
        generate.generate(CFG, tiny, [1, 2], 3, temperature=-1.0)
    no_mtp = {"params": {k: v for k, v in tiny["params"].items() if k != "mtp_0"}, "router": tiny["router"]}
    with pytest.raises(ValueError, match="needs an MTP module"):
        generate.generate_speculative(CFG.replace(num_nextn_predict_layers=0), no_mtp, [1, 2], 3)
    with pytest.raises(ValueError, match="prompt 0: empty prompt"):
        generate.generate_speculative(CFG, tiny, [], 3)


# --------------------------------------------------------------------------------------------------------------
# Speculative decoding
# --------------------------------------------------------------------------------------------------------------
def _check_speculative(variables, prompt, full_forward, eos_id=None):
    plain = _greedy(variables, [prompt], eos_id)[0][0]
    spec, stats = generate.generate_speculative(CFG, variables, prompt, N, eos_id=eos_id, max_len=MAX_LEN)
    np.testing.assert_array_equal(spec, plain)
    # Every draft is the argmax of the MTP logits of a full training-time forward: mtp_logits[0][i] predicts
    # token i + 2, so the draft for new token j (position P + j) comes from MTP position P + j - 2.
    seq = np.concatenate([prompt, spec])
    _, mtp = full_forward(variables, seq)
    drafts = stats["drafts"]
    js = np.nonzero(drafts >= 0)[0]
    assert len(js) == stats["verify_steps"]  # one draft verified per main-model step
    np.testing.assert_array_equal(drafts[js], mtp[len(prompt) + js - 2].argmax(-1))
    accepted = int(np.sum(drafts[js] == spec[js]))
    assert accepted == stats["drafts_accepted"]
    return spec, stats


def test_speculative_equals_greedy_random_model(tiny, full_forward):
    """A random MTP module: drafts are (almost) always rejected; the output is still exactly greedy's."""
    for p in PROMPTS:
        spec, stats = _check_speculative(tiny, p, full_forward)
        assert len(spec) == min(N, MAX_LEN - len(p)) and stats["verify_steps"] >= len(spec) // 2


def test_speculative_equals_greedy_with_accepted_drafts(predictable, full_forward):
    accepted = rejected = 0
    for p in PROMPTS:
        spec, stats = _check_speculative(predictable, p, full_forward)
        accepted += stats["drafts_accepted"]
        rejected += stats["verify_steps"] - stats["drafts_accepted"]
    assert accepted >= 4 and rejected >= 1, (accepted, rejected)  # both branches ran, in mixed order
    eos = int(spec[3])
    spec_e, _ = _check_speculative(predictable, PROMPTS[-1], full_forward, eos_id=eos)
    assert spec_e[-1] == eos and len(spec_e) <= 4


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def test_cli_hf_and_checkpoint(tiny, tmp_path, capsys):
    """--hf DIR (hf.save_pretrained) and --checkpoint RUN (the layout train/loop.py writes) print the prompt and
    its greedy continuation, decoded with the byte tokenizer."""
    from deepseek_jax import hf
    from deepseek_jax.checkpoint import Checkpointer
    from deepseek_jax.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    prompt = "ab"
    expect = prompt + tok.decode(generate.generate(CFG, tiny, tok.encode(prompt), N, max_len=MAX_LEN))
    flags = ["--prompt", prompt, "--max-new-tokens", str(N), "--max-len", str(MAX_LEN), "--no-eos"]

    hf.save_pretrained(CFG, tiny, tmp_path / "hf")
    assert generate.main(["--hf", str(tmp_path / "hf"), "--tokenizer", "byte"] + flags) == 0
    assert capsys.readouterr().out.splitlines()[0] == expect.splitlines()[0]

    run = tmp_path / "run"
    ck = Checkpointer(str(run / "checkpoints"))
    state = {"params": tiny["params"], "router": tiny["router"], "step": jnp.int32(3)}
    ck.save(3, state, {"it": 0}, {"model_config": CFG.to_dict(), "config": {"data.tokenizer": "byte"}})
    ck.close()
    assert generate.main(["--checkpoint", str(run), "--speculative"] + flags) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == expect.splitlines()[0]
    assert "identical to plain greedy: True" in captured.err
    with pytest.raises(ValueError, match="no checkpoints/ directory"):
        generate.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "x"])


def test_nan_parameters_are_refused_not_decoded_as_token_0(tiny):
    bad = jax.tree_util.tree_map(lambda x: x, tiny)
    bad["params"]["lm_head"]["kernel"] = bad["params"]["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"non-finite logits for prompt\(s\) \[0\]"):
        _greedy(bad, [PROMPTS[0]])


def test_load_run_falls_back_past_a_corrupt_newest_checkpoint(tiny, tmp_path, capsys):
    """As the training loop: 8 flipped bits in the newest step are caught by its checksums and the previous
    step is loaded, with one line on stderr; the reader leaves the run's files where they are."""
    from deepseek_jax.checkpoint import Checkpointer

    run = tmp_path / "run"
    ck = Checkpointer(str(run / "checkpoints"))
    meta = {"model_config": CFG.to_dict(), "config": {"data.tokenizer": "byte"}}
    for s in (3, 5):
        ck.save(s, {"params": tiny["params"], "router": tiny["router"], "step": jnp.int32(s)}, {"it": s}, meta)
    ck.close()
    files = [os.path.join(r, f) for r, _, fs in os.walk(run / "checkpoints" / "5" / "state") for f in fs]
    path = max(files, key=os.path.getsize)
    b = bytearray(open(path, "rb").read())
    for i in range(8):
        b[len(b) // 3 + 7 * i] ^= 0x40
    open(path, "wb").write(bytes(b))
    cfg, variables, tok, step = generate.load_run(str(run))
    assert step == 3 and tok == "byte" and cfg == CFG
    for x, y in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(
            {"params": tiny["params"], "router": tiny["router"]})):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    err = capsys.readouterr().err
    assert "checkpoint step 5 could not be restored" in err and "checksum mismatch" in err, err
    assert os.path.isdir(run / "checkpoints" / "5")
    with pytest.raises(ValueError, match="checksum mismatch"):  # asking for that step explicitly
        generate.load_run(str(run), step=5)
