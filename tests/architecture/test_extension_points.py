"""BUILD.md "Architecture" says a new MoE dispatch is one function in ops/moe_dispatch.py plus its name in
config.MOE_DISPATCHES. This does exactly that with a test-sized dispatch (a slow per-expert Python loop, written
independently of the shipped kernels) and checks the whole model computes the same function as with "dense"."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config, model
from deepseek_jax.ops import moe_dispatch


def dispatch_per_expert_loop(x_nd, idx_nk, w_nk, wg, wu, wd, tile: int = 0):
    """For each expert e: the rows routed to it, through its SwiGLU, weighted by their gate, added up."""
    y = jnp.zeros(x_nd.shape, jnp.float32)
    for e in range(wg.shape[0]):
        gate_n = jnp.where(idx_nk == e, w_nk, 0.0).sum(-1)          # token n's gate weight for expert e (or 0)
        h = jax.nn.silu(x_nd @ wg[e]) * (x_nd @ wu[e])
        y = y + gate_n[:, None] * (h @ wd[e]).astype(jnp.float32)
    return y


def test_a_new_dispatch_is_one_function_and_one_name(monkeypatch):
    monkeypatch.setitem(moe_dispatch.DISPATCHES, "per_expert_loop", dispatch_per_expert_loop)
    monkeypatch.setattr(config, "MOE_DISPATCHES", config.MOE_DISPATCHES + ("per_expert_loop",))
    cfg = config.preset("tiny")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    variables = model.init(cfg, jax.random.PRNGKey(0))
    out = {name: jax.jit(model.Transformer(cfg.replace(moe_dispatch=name)).apply)(variables, tokens)
           for name in ("dense", "per_expert_loop")}
    np.testing.assert_allclose(np.asarray(out["per_expert_loop"].logits), np.asarray(out["dense"].logits),
                               rtol=1e-5, atol=1e-5)
    # not vacuous: the routed experts matter to the logits
    zero_experts = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "experts_" in jax.tree_util.keystr(p) else v, variables)
    moved = jax.jit(model.Transformer(cfg.replace(moe_dispatch="dense")).apply)(zero_experts, tokens).logits
    assert float(jnp.abs(moved - out["dense"].logits).max()) > 1e-3
