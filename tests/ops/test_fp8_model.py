"""ModelConfig(fp8=...) in the model (docs/fp8.md item 6): which GEMMs go through the FP8
policy (MLA projections, dense FFN, shared and routed experts; never embedding, head, router, eh_proj or the
attention core), the FP8 routed-expert dispatch equals a per-token loop of the FP8 linear, and a tiny model trains
with FP8 under jit + nn.scan + remat with its loss tracking FP32's."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config
from deepseek_jax.ops import fp8
from deepseek_jax.ops import moe_dispatch
from deepseek_jax.model import Transformer
from deepseek_jax.train import default_train_config, init_train_state, make_train_step

from testing_utils import random_variables

# One dense and one MoE layer, no MTP: the same GEMM kinds as "tiny" with less to compile (compiling the two train
# steps is nearly all of this file's time).
TINY = config.preset("tiny", moe_dispatch="dense", num_hidden_layers=2, num_nextn_predict_layers=0)
SEQ = 16


class _Recorder(fp8.Fp8DotGeneral):
    """The FP8 policy, recording the [in, out] weight shape of every GEMM it is handed while tracing."""

    seen = []

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        _Recorder.seen.append(("linear", tuple(rhs.shape)))
        return super().__call__(lhs, rhs, dimension_numbers, precision, preferred_element_type)

    def linear_fn(self, x_mk, w_kn):
        _Recorder.seen.append(("expert", tuple(w_kn.shape)))
        return super().linear_fn(x_mk, w_kn)


def test_fp8_policy_covers_exactly_the_paper_gemms():
    c = config.preset("tiny")  # with MTP: its eh_proj must stay out of FP8
    _Recorder.seen = []
    jax.eval_shape(lambda: Transformer(c, dot_general=_Recorder(config.Fp8Config())).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    seen = set(_Recorder.seen)
    d, H = c.hidden_size, c.num_attention_heads
    want = {("linear", s) for s in [
        (d, c.q_lora_rank), (c.q_lora_rank, H * c.qk_head_dim),  # q_a, q_b
        (d, c.kv_lora_rank + c.qk_rope_head_dim), (c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim)),
        (H * c.v_head_dim, d),  # o_proj
        (d, c.intermediate_size), (c.intermediate_size, d),  # dense FFN
        (d, c.moe_intermediate_size * c.n_shared_experts), (c.moe_intermediate_size * c.n_shared_experts, d)]}
    want |= {("expert", (d, c.moe_intermediate_size)), ("expert", (c.moe_intermediate_size, d))}
    assert seen == want, (seen - want, want - seen)
    # Never: the head [d, V], the router [d, E], MTP's eh_proj [2d, d].
    assert not any(s[1] in ((d, c.vocab_size), (d, c.n_routed_experts), (2 * d, d)) for s in seen)
    # ModelConfig(fp8=...) alone installs the policy.
    assert fp8.dot_general_for(c.replace(fp8={}).fp8) == fp8.Fp8DotGeneral(config.Fp8Config())
    assert fp8.dot_general_for(c.fp8) is None


def test_fp8_routed_experts_equal_per_token_fp8_loop():
    """dispatch_fp8_tiles == for each token, sum_k g_k SwiGLU_FP8(x) through fp8_linear on that token alone. Tile
    grouping changes only the Wgrad's token tiles, so the forward must agree to fp32 rounding."""
    r = np.random.RandomState(0)
    N, d, F, E, K = 24, 64, 32, 4, 2
    x = jnp.asarray(r.normal(size=(N, d)), jnp.float32)
    wg, wu = (jnp.asarray(r.normal(size=(E, d, F)) * 0.1, jnp.float32) for _ in range(2))
    wd = jnp.asarray(r.normal(size=(E, F, d)) * 0.1, jnp.float32)
    idx = jnp.asarray(np.stack([r.choice(E, K, replace=False) for _ in range(N)]), jnp.int32)
    w = jnp.asarray(r.uniform(size=(N, K)), jnp.float32)
    lin = fp8.Fp8DotGeneral(config.Fp8Config()).linear_fn
    got = moe_dispatch.dispatch_fp8_tiles(x, idx, w, wg, wu, wd, 8, lin)

    @jax.jit
    def per_row(x, idx, w):  # every (token, slot) alone: [1, d] rows, its expert's weights
        row = jax.vmap(lin)
        x_r = jnp.repeat(x, K, axis=0)[:, None]  # [N*K, 1, d]
        e = idx.reshape(-1)
        h = jax.nn.silu(row(x_r, wg[e])) * row(x_r, wu[e])
        y = row(h, wd[e])[:, 0].reshape(N, K, d)
        return jnp.einsum("nkd,nk->nd", y, w)

    want = np.asarray(per_row(x, idx, w))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    g = jax.grad(lambda wg: moe_dispatch.dispatch_fp8_tiles(x, idx, w, wg, wu, wd, 8, lin).sum())(wg)
    g32 = jax.grad(lambda wg: moe_dispatch.dispatch_dense(x, idx, w, wg, wu, wd).sum())(wg)
    assert np.linalg.norm(g - g32) / np.linalg.norm(g32) < 0.1  # FP8 gradient, a few percent off FP32


def _variables():
    return random_variables(TINY, SEQ)


def test_tiny_model_trains_with_fp8_under_scan_and_remat_tracking_fp32():
    tc = default_train_config(total_steps=100)
    tc.optim.update(dict(peak_lr=3e-3, warmup_steps=0, constant_steps=100, cosine_steps=0, final_stages=[]))
    variables = _variables()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 1, SEQ + 1), 2, TINY.vocab_size)
    batch = {"tokens": tokens, "mask": jnp.ones((4, 1, SEQ))}
    curves = {}
    for name, cfg in (("fp32", TINY.replace(remat_policy="full")),
                      ("fp8", TINY.replace(remat_policy="full", fp8={}))):
        state = init_train_state(cfg, tc, None, variables=variables)
        step = jax.jit(make_train_step(cfg, tc))
        losses = []
        for _ in range(20):
            state, m = step(state, batch)
            losses.append(float(m["ce"]))
        curves[name] = np.asarray(losses)
        assert int(state.skipped) == 0
    a, b = curves["fp32"], curves["fp8"]
    assert np.isfinite(b).all() and b[-1] < 0.5 * b[0], b  # it learns (a memorised batch)
    gap = np.abs(b - a) / a
    # Relative CE gap per step (the paper: < 0.25% at scale; this model's d = 64 is half a quantization tile).
    assert gap.max() < 0.03, (a, b)
    assert gap.max() > 1e-6  # FP8 really was on
