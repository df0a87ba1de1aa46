"""Decoding from the latent cache.

The cache holds, per main-model layer, only what MLA needs to rebuild keys and values: the normalized latent
c_kv and the rotated shared rope key (kv_lora_rank + qk_rope_head_dim numbers per token per layer; 576 for V3,
where multi-head attention would hold 40,960). ``Transformer.apply(variables, tokens, positions, cache)`` writes
the new tokens' latents at their positions and attends through the absorbed path.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.attention import init_layer_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype="float32") -> Dict[str, Any]:
    """Latent KV cache for every main-model layer: {"dense"|"moe": {"c_kv" [L, B, S, r], "k_rope" [L, B, S, dr]}}.
    Bytes per token per layer = (kv_lora_rank + qk_rope_head_dim) * itemsize."""
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    one = init_layer_cache(cfg, batch_size, max_len, dtype)
    out = {}
    for kind, n in (("dense", cfg.num_dense_layers), ("moe", cfg.num_moe_layers)):
        if n:
            out[kind] = jax.tree_util.tree_map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), one)
    return out


def sample_logits(logits_bv: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next token ids [B] from logits [B, V]: greedy when temperature == 0, else softmax(logits / T) restricted
    to the top_k most likely (0 = all) and to the smallest set with cumulative probability >= top_p."""
    logits = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        # keep tokens whose preceding cumulative mass is < top_p (always keeps the most likely one)
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, -1)) < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def generate(cfg: ModelConfig, variables, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None):
    """Continue one prompt (a sequence of token ids) by up to max_new_tokens tokens from the latent cache:
    one prefill through the model, then a single compiled scan of decode steps (absorbed MLA). Returns the new
    token ids as a numpy array, cut after the first EOS (included) when eos_id is given."""
    import numpy as np

    from deepseek_jax.model import Transformer, check_tokens

    prompt = np.asarray(prompt, np.int32).reshape(1, -1)
    P = prompt.shape[1]
    if P == 0:
        raise ValueError("prompt: empty prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    check_tokens(prompt, cfg.vocab_size)
    total = P + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    net = Transformer(cfg)

    @jax.jit
    def run(variables, prompt, rng):
        cache = init_cache(cfg, 1, total, cfg.dtype)
        out = net.apply(variables, prompt, jnp.arange(P, dtype=jnp.int32)[None], cache)
        rng, sub = jax.random.split(rng)
        first = sample_logits(out.logits[:, -1], sub, temperature, top_k, top_p)

        def step(carry, pos):
            tok, cache, rng = carry
            o = net.apply(variables, tok[:, None], jnp.full((1, 1), pos, jnp.int32), cache)
            rng, sub = jax.random.split(rng)
            nxt = sample_logits(o.logits[:, -1], sub, temperature, top_k, top_p)
            return (nxt, o.cache, rng), tok

        (last, _, _), toks = jax.lax.scan(step, (first, out.cache, rng),
                                          jnp.arange(P, total - 1, dtype=jnp.int32))
        return jnp.concatenate([toks[:, 0], last])

    new = np.asarray(run(variables, jnp.asarray(prompt), jax.random.PRNGKey(seed)))
    if eos_id is not None and (new == eos_id).any():
        new = new[:int(np.argmax(new == eos_id)) + 1]
    return new
