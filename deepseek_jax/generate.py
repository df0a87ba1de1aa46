"""Decoding from the latent cache, and MTP self-speculative decoding (V2 §2.1.3, V3 §2.1.1, §2.2, §5.4.3).

Cache. Per main-model layer the cache holds only what MLA needs to rebuild keys and values: the normalized
latent c_kv (eq. 1) and the rotated shared rope key k_R (eq. 3), i.e. (kv_lora_rank + qk_rope_head_dim) numbers
per token per layer (576 for V3, where multi-head attention would hold 2 * 128 * 160 = 40,960). Slot s of the
cache holds the token at position s (``attention._write_cache``), so rows of a batch may sit at different
positions.

Plain decoding (``generate_batch``; ``generate`` for one prompt), one jitted function for the whole thing:
  1. prefill: the right-padded prompts [B, P] at positions 0..P-1 through the NAIVE MLA path (per-head keys and
     values expanded from the latent: the training computation), writing the latents into the cache. Padding
     tokens of a short row land in slots >= its length; they are never visible (causal by position) and are
     overwritten by that row's own generated tokens before any query can see them;
  2. decode: a ``lax.while_loop`` of one-token steps through the ABSORBED path (W_UK folded into the query,
     W_UV into the output: attention runs on the cached latent directly). Each row b feeds its last token at
     its own position p_b, samples the next one, and stops on EOS, on ``max_new_tokens``, or when its sequence
     reaches ``max_len``; the loop ends when every row has stopped. Shapes are static, so nothing recompiles
     per step (and a second call with the same shapes and sampling settings reuses the compiled program).

Speculative decoding (``generate_speculative``; greedy, batch 1). The MTP module (V3 §2.2) at position i maps
(h_i, Emb(t_{i+1})) to a prediction of t_{i+2}; V3 §5.4.3 uses it to draft the token after next. Loop state:
the pending token x at position p (decided, not yet fed) and a draft d for position p+1.
  verify   the main model runs on [x, d] at positions [p, p+1] (absorbed, one T=2 step): y0 = argmax at p is
           the true next token; d is accepted iff d == y0, and then y1 = argmax at p+1 is also true. Emits y0,
           or y0 and y1: exactly the tokens plain greedy decoding emits, one or two per main-model step.
  draft    the MTP module runs on positions [p, p+1] with inputs (h_p, Emb(y0)) and (h_{p+1}, Emb(y1)),
           writing its own one-layer latent cache; the next draft is its argmax at p+1 if d was accepted,
           else at p. On rejection the entries at p+1 (main and MTP caches) were computed from the wrong
           token; they are overwritten next step (the next step writes p+1 first) before anything reads them.
  prefill  the main model on the prompt t_0..t_{P-1} (naive), y = t_P = argmax at P-1; the MTP module on
           positions 0..P-1 with (h_j, Emb(t_{j+1})), t_P included; its argmax at P-1 is the first draft.
h is the main model's final hidden state after the final norm (layers/mtp.py). Only the first MTP module is
used (one draft token per step, as in the paper). Batch 1 only: with several rows each row accepts a different
number of tokens per step, which needs per-row positions in the verify step and is not implemented.
Greedy only: sampling would need the speculative-sampling acceptance rule, also not implemented.

Command line (see ``main``):
    python -m deepseek_jax.generate --checkpoint runs/quickstart --prompt "def f(x):" [--speculative]
    python -m deepseek_jax.generate --hf DIR --prompt "..." --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import compat
from deepseek_jax import hf
from deepseek_jax.checkpoint import CheckpointError, Checkpointer
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.tokenizer import get_tokenizer
from deepseek_jax.layers.attention import init_layer_cache
from deepseek_jax.layers.linear import Dense
from deepseek_jax.layers.mtp import MTPModule
from deepseek_jax.model import Block, Embed, Transformer, check_tokens, unstack_cache, unstack_layers
from deepseek_jax.ops.moe_dispatch import resolve_dispatch

PAD_OUT = -1  # fills the output buffer after a row has stopped (never a valid token id)


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------
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


def init_mtp_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype="float32") -> Dict[str, Any]:
    """The first MTP module's own attention cache (one layer, same latent layout as the main model's)."""
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError("init_mtp_cache: the config has no MTP module (num_nextn_predict_layers=0)")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    return init_layer_cache(cfg, batch_size, max_len, dtype)


def cache_bytes_per_token_per_layer(cache: Dict[str, Any]) -> float:
    """Bytes the cache spends per (sequence, token slot, layer), measured from its arrays: total bytes divided
    by layers * batch * slots. For MLA this is (kv_lora_rank + qk_rope_head_dim) * itemsize."""
    stacked = "dense" in cache or "moe" in cache
    total = slots = 0
    for stack in (cache.values() if stacked else [cache]):
        leaves = jax.tree_util.tree_leaves(stack)
        total += sum(a.size * a.dtype.itemsize for a in leaves)
        slots += int(np.prod(leaves[0].shape[:3 if stacked else 2]))  # [L, B, S, ...] or one layer's [B, S, ...]
    return total / slots


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = no top-k cut; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, vocab_size: int) -> "Sampling":
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, (int, np.integer)) and 0 <= self.top_k <= vocab_size):
            raise ValueError(f"top_k must be an int in [0, vocab_size={vocab_size}], got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return Sampling(float(self.temperature), int(self.top_k), float(self.top_p))


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


# --------------------------------------------------------------------------------------------------------------
# Input checks (host side: the values are concrete here, unlike inside jit)
# --------------------------------------------------------------------------------------------------------------
def _check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int, max_len: Optional[int]):
    """-> (list of int32 arrays, max_len). ValueError naming the prompt for every bad input."""

    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts: token ids expected, got text (tokenize it first)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: no prompts given")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    out = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1:
            raise ValueError(f"prompt {i}: a 1-D sequence of token ids expected, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"prompt {i}: empty prompt (at least one token is needed to condition on)")
        try:
            check_tokens(a, cfg.vocab_size)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        out.append(a.astype(np.int32))
    longest = max(len(a) for a in out)
    if max_len is None:
        max_len = longest + int(max_new_tokens)
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} (longest prompt {longest} + max_new_tokens {max_new_tokens} when not "
                         f"given) exceeds max_position_embeddings={cfg.max_position_embeddings}")
    for i, a in enumerate(out):
        if len(a) >= max_len:
            raise ValueError(f"prompt {i}: {len(a)} tokens, but max_len={max_len} leaves no room for a new token "
                             f"(max_len counts prompt + generated tokens)")
    return out, int(max_len)


def _eos(eos_id, vocab_size: int) -> int:
    """EOS id for the compiled loop (-1: none, never matches a token)."""
    if eos_id is None:
        return -1
    if not (isinstance(eos_id, (int, np.integer)) and 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or an int in [0, vocab_size={vocab_size}), got {eos_id!r}")
    return int(eos_id)


DECODE_TILE = 8  # sorted_tiles rows per tile in decode steps (see _step_cfg)
GATHER_MAX_ROWS = 8  # decode steps routing at most this many rows use the "gather" MoE dispatch on CPU


def _step_cfg(cfg: ModelConfig, tokens_per_step: int) -> ModelConfig:
    """The config of the decode-step modules. A step routes only B * T * top-k rows, so on CPU the training-sized
    layouts of "auto" (bucket_tiles' per-expert buckets, 128-row tiles) would be mostly padding: steps routing at
    most GATHER_MAX_ROWS rows gather each row's expert weights instead (moe_dispatch.dispatch_gather), larger ones use
    sorted_tiles with 8-row tiles: on CPU, at decode batch sizes, these beat both 128-row tiles and every expert on
    every row (measurements: BUILD.md "Inference", benchmarks/results/decode_cpu.md). Same parameters and the same
    function: the dispatch only changes how rows meet their experts' weights. An explicit non-auto dispatch is kept."""
    if cfg.moe_dispatch != "auto" or resolve_dispatch("auto") not in ("sorted_tiles", "bucket_tiles"):
        return cfg
    if tokens_per_step * cfg.num_experts_per_tok <= GATHER_MAX_ROWS:
        return cfg.replace(moe_dispatch="gather")
    return cfg.replace(moe_dispatch="sorted_tiles", moe_tile_size=min(cfg.moe_tile_size, DECODE_TILE))


SHAPE_BUCKET = 16  # prompt width and cache length are rounded up to this, so similar requests share a compile


def _shapes(cfg: ModelConfig, prompts, max_len: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Right-padded prompts [B, P] (P = longest rounded up to SHAPE_BUCKET), lengths [B], and the cache length:
    max_len rounded up to SHAPE_BUCKET (capped at max_position_embeddings). Slots past a row's last position are
    never visible to it (causal by position), so neither rounding changes any output."""
    up = lambda n: -(-n // SHAPE_BUCKET) * SHAPE_BUCKET
    longest = max(len(a) for a in prompts)
    P = min(up(longest), max_len)
    tokens_bp = np.zeros((len(prompts), P), np.int32)  # padding id 0: never visible, see the module docstring
    for i, a in enumerate(prompts):
        tokens_bp[i, :len(a)] = a
    lengths_b = np.asarray([len(a) for a in prompts], np.int32)
    cache_len = max(min(up(max_len), cfg.max_position_embeddings), max_len)
    return tokens_bp, lengths_b, cache_len


# --------------------------------------------------------------------------------------------------------------
# Plain decoding
# --------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "max_new_tokens", "sampling", "return_logits",
                                             "dot_general"))
def _decode(variables, tokens_bp, lengths_b, limits_b, eos_id, rng, *, cfg: ModelConfig, cache_len: int,
            max_new_tokens: int, sampling: Sampling, return_logits: bool, dot_general=None):
    """Prefill (naive) + while_loop of absorbed decode steps. Returns (tokens [B, N] (PAD_OUT after a row
    stopped), counts [B], logits [B, N, V] or None, bad [B]: a row sampled from non-finite logits).
    limits_b: new tokens allowed per row."""

    B, P = tokens_bp.shape
    net, step_net = Transformer(cfg, dot_general), Transformer(_step_cfg(cfg, B), dot_general, stacked=False)
    N = max_new_tokens
    pos_bp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (B, P))
    out = net.apply(variables, tokens_bp, pos_bp, init_cache(cfg, B, cache_len, cfg.dtype), absorb=False)
    last_bv = out.logits[jnp.arange(B), lengths_b - 1].astype(jnp.float32)
    rng, sub = jax.random.split(rng)
    tok_b = sample_logits(last_bv, sub, sampling.temperature, sampling.top_k, sampling.top_p)
    toks_bn = jnp.full((B, N), PAD_OUT, jnp.int32).at[:, 0].set(tok_b)
    logits_bnv = (jnp.zeros((B, N, cfg.vocab_size), jnp.float32).at[:, 0].set(last_bv) if return_logits
                  else jnp.zeros((), jnp.float32))
    count_b = jnp.ones((B,), jnp.int32)
    done_b = (tok_b == eos_id) | (count_b >= limits_b)
    bad_b = ~jnp.isfinite(last_bv).all(-1)
    step_vars = unstack_layers(variables, cfg)  # per-layer weights, sliced once, outside the loop

    def cond(c):
        i, _, _, _, _, done_b, *_ = c
        return (i < N) & ~jnp.all(done_b)

    def body(c):
        i, tok_b, pos_b, cache, count_b, done_b, toks_bn, logits_bnv, rng, bad_b = c
        o = step_net.apply(step_vars, tok_b[:, None], pos_b[:, None], cache, absorb=True)
        step_bv = o.logits[:, 0].astype(jnp.float32)
        rng, sub = jax.random.split(rng)
        nxt_b = sample_logits(step_bv, sub, sampling.temperature, sampling.top_k, sampling.top_p)
        live_b = ~done_b
        bad_b = bad_b | (live_b & ~jnp.isfinite(step_bv).all(-1))
        toks_bn = toks_bn.at[:, i].set(jnp.where(live_b, nxt_b, PAD_OUT))
        if return_logits:
            logits_bnv = logits_bnv.at[:, i].set(step_bv)
        count_b = count_b + live_b.astype(jnp.int32)
        done_b = done_b | (nxt_b == eos_id) | (count_b >= limits_b)
        # a stopped row keeps feeding its last token at its last position: same values into the same slot
        tok_b = jnp.where(live_b, nxt_b, tok_b)
        pos_b = jnp.where(live_b, pos_b + 1, pos_b)
        return i + 1, tok_b, pos_b, o.cache, count_b, done_b, toks_bn, logits_bnv, rng, bad_b

    c = (jnp.int32(1), tok_b, lengths_b, unstack_cache(out.cache), count_b, done_b, toks_bn, logits_bnv, rng,
         bad_b)
    c = jax.lax.while_loop(cond, body, c)
    return c[6], c[4], (c[7] if return_logits else None), c[9]


def _refuse_nonfinite(bad_b: np.ndarray) -> None:
    if bad_b.any():
        raise ValueError(f"generate: the model produced non-finite logits for prompt(s) "
                         f"{np.flatnonzero(bad_b).tolist()} (NaN/inf parameters, or an out-of-range token id or "
                         "position); no tokens returned")


def generate_batch(cfg: ModelConfig, variables, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None,
                   max_len: Optional[int] = None, return_logits: bool = False, dot_general=None):
    """Continue each prompt (prompts of different lengths allowed) by up to ``max_new_tokens`` tokens.

    max_len: the most tokens (prompt + generated) any row may reach (the cache length, rounded up to 16);
    default longest prompt + max_new_tokens. A row stops after EOS (``eos_id``; included in its output), after
    max_new_tokens, or at max_len. Returns a list of int32 arrays (the new tokens of each prompt), and with
    ``return_logits`` also a list of fp32 [n_i, V] arrays: the logits each new token was sampled from.
    """
    sampling = Sampling(temperature, top_k, top_p).check(cfg.vocab_size)
    prompts, max_len = _check_prompts(cfg, prompts, max_new_tokens, max_len)
    B = len(prompts)
    tokens_bp, lengths_b, cache_len = _shapes(cfg, prompts, max_len)
    limits_b = np.minimum(max_new_tokens, max_len - lengths_b).astype(np.int32)
    eos = jnp.int32(_eos(eos_id, cfg.vocab_size))
    toks, counts, logits, bad = _decode(variables, jnp.asarray(tokens_bp), jnp.asarray(lengths_b),
                                   jnp.asarray(limits_b), eos, jax.random.PRNGKey(seed), cfg=cfg, cache_len=cache_len,
                                   max_new_tokens=int(max_new_tokens), sampling=sampling,
                                   return_logits=return_logits, dot_general=dot_general)
    toks, counts = np.asarray(toks), np.asarray(counts)
    _refuse_nonfinite(np.asarray(bad))
    new = [toks[i, :counts[i]] for i in range(B)]
    if return_logits:
        logits = np.asarray(logits)
        return new, [logits[i, :counts[i]] for i in range(B)]
    return new


def generate(cfg: ModelConfig, variables, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None, max_len: Optional[int] = None):
    """One prompt (a sequence of token ids) -> its new token ids (numpy int32), EOS included when hit."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 1:
        raise ValueError(f"prompt: a 1-D sequence of token ids expected, got shape {prompt.shape} "
                         "(use generate_batch for several prompts)")
    return generate_batch(cfg, variables, [prompt], max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                          max_len)[0]


# --------------------------------------------------------------------------------------------------------------
# MTP self-speculative decoding (greedy, batch 1)
# --------------------------------------------------------------------------------------------------------------
def _mtp_apply(cfg: ModelConfig, variables, hidden_btd, next_tokens_bt, positions_bt, cache, absorb: bool,
               dot_general=None):
    """The first MTP module on a cache: (h_i, Emb(t_{i+1})) at positions i -> (logits for t_{i+2} [B, T, V],
    its updated cache). Applied with the module's own parameter subtrees (embedding and head are shared)."""

    params, router = variables["params"], variables.get("router", {})
    emb = Embed(cfg).apply({"params": params["embed"]}, next_tokens_bt)
    v = {"params": params["mtp_0"]}
    if "mtp_0" in router:
        v["router"] = router["mtp_0"]
    _, normed, _, cache = MTPModule(cfg, Block, cfg.num_hidden_layers, dot_general).apply(
        v, hidden_btd, emb, positions_bt, cache, absorb)
    head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.dtype, cfg.param_dtype, cfg.initializer_range)
    return head.apply({"params": params["lm_head"]}, normed), cache


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "max_new_tokens", "dot_general"))
def _speculative(variables, tokens_1p, length, limit, eos_id, *, cfg: ModelConfig, cache_len: int,
                 max_new_tokens: int, dot_general=None):
    """tokens_1p: the prompt right-padded to P; length: its true length L. Returns (tokens [N + 1] (PAD_OUT past
    the end), count, verify steps, accepted drafts, drafts [N + 1]: drafts[j] is the MTP draft verified for new
    token j, PAD_OUT where none was). The verify step writes slots p, p + 1 <= L + limit - 1 < cache_len."""

    step_cfg = _step_cfg(cfg, 2)  # verify: [pending token, draft]; the MTP step: the same two positions
    net, step_net = Transformer(cfg, dot_general), Transformer(step_cfg, dot_general, stacked=False)
    _, P = tokens_1p.shape
    N = max_new_tokens
    pos_1p = jnp.arange(P, dtype=jnp.int32)[None]
    out = net.apply(variables, tokens_1p, pos_1p, init_cache(cfg, 1, cache_len, cfg.dtype), absorb=False)
    first = jnp.argmax(out.logits[0, length - 1]).astype(jnp.int32)
    bad = ~jnp.isfinite(out.logits[0, length - 1]).all()
    # MTP inputs at positions j < L: (h_j, Emb(t_{j+1})) with t_L = first; positions >= L are padding, overwritten
    # by the first verify/draft step before any query can see them.
    nxt_1p = jnp.concatenate([tokens_1p[:, 1:], jnp.zeros((1, 1), jnp.int32)], 1).at[0, length - 1].set(first)
    mlogits, mcache = _mtp_apply(cfg, variables, out.hidden, nxt_1p, pos_1p,
                                 init_mtp_cache(cfg, 1, cache_len, cfg.dtype), False, dot_general)
    draft = jnp.argmax(mlogits[0, length - 1]).astype(jnp.int32)
    toks = jnp.full((N + 1,), PAD_OUT, jnp.int32).at[0].set(first)
    drafts = jnp.full((N + 1,), PAD_OUT, jnp.int32)
    step_vars = unstack_layers(variables, cfg)  # per-layer weights, sliced once, outside the loop

    def cond(c):
        count, done = c[4], c[5]
        return (count < limit) & ~done

    def body(c):
        x, d, p, cache, count, done, mcache, toks, steps, accepted, drafts, bad = c
        drafts = drafts.at[count].set(d)  # d guesses the token at p + 1 = L + count, i.e. new token `count`
        pos_12 = jnp.stack([p, p + 1])[None]
        o = step_net.apply(step_vars, jnp.stack([x, d])[None], pos_12, cache, absorb=True)
        y = jnp.argmax(o.logits[0], -1).astype(jnp.int32)  # [2]
        bad = bad | ~jnp.isfinite(o.logits[0, 0]).all()
        acc = d == y[0]
        toks = toks.at[count].set(y[0]).at[count + 1].set(jnp.where(acc, y[1], PAD_OUT))
        done = (y[0] == eos_id) | (acc & (y[1] == eos_id))
        mlog, mcache = _mtp_apply(step_cfg, variables, o.hidden, y[None], pos_12, mcache, True, dot_general)
        dr = jnp.argmax(mlog[0], -1).astype(jnp.int32)
        acc_i = acc.astype(jnp.int32)
        return (jnp.where(acc, y[1], y[0]), jnp.where(acc, dr[1], dr[0]), p + 1 + acc_i, o.cache,
                count + 1 + acc_i, done, mcache, toks, steps + 1, accepted + acc_i, drafts, bad)

    c = (first, draft, length, unstack_cache(out.cache), jnp.int32(1), first == eos_id, mcache, toks, jnp.int32(0),
         jnp.int32(0), drafts, bad)
    c = jax.lax.while_loop(cond, body, c)
    return c[7], c[4], c[8], c[9], c[10], c[11]


def generate_speculative(cfg: ModelConfig, variables, prompt, max_new_tokens: int, eos_id=None,
                         max_len: Optional[int] = None, dot_general=None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Greedy decoding of one prompt with MTP drafts verified by the main model (module docstring). Returns the
    new tokens (identical to ``generate(..., temperature=0)``) and stats: verify_steps (main-model decode
    calls), drafts_accepted, acceptance_rate (accepted / verified drafts), tokens_per_step (new tokens per
    main-model call, prefill included), drafts (int32 [n]: the draft verified for each new token, -1 where
    none was: token 0 and every token that came as the second of an accepted pair)."""
    if cfg.num_nextn_predict_layers < 1 or "mtp_0" not in variables.get("params", {}):
        raise ValueError("speculative decoding needs an MTP module: the config has num_nextn_predict_layers="
                         f"{cfg.num_nextn_predict_layers} and the params "
                         f"{'have' if 'mtp_0' in variables.get('params', {}) else 'lack'} 'mtp_0'")
    prompt = np.asarray(prompt)
    if prompt.ndim != 1:
        raise ValueError(f"prompt: speculative decoding takes one prompt (1-D token ids), got shape {prompt.shape}")
    (p,), max_len = _check_prompts(cfg, [prompt], max_new_tokens, max_len)
    limit = min(int(max_new_tokens), max_len - len(p))
    tokens_1p, _, cache_len = _shapes(cfg, [p], max_len)
    eos = jnp.int32(_eos(eos_id, cfg.vocab_size))
    toks, count, steps, accepted, drafts, bad = _speculative(
        variables, jnp.asarray(tokens_1p), jnp.int32(len(p)), jnp.int32(limit), eos, cfg=cfg, cache_len=cache_len,
        max_new_tokens=int(max_new_tokens), dot_general=dot_general)
    _refuse_nonfinite(np.asarray(bad)[None])
    toks, count, steps, accepted = np.asarray(toks), int(count), int(steps), int(accepted)
    new = toks[:min(count, limit)]
    if eos_id is not None and (new == eos_id).any():
        new = new[:int(np.argmax(new == eos_id)) + 1]
    stats = {"verify_steps": steps, "drafts_accepted": accepted,
             "acceptance_rate": accepted / steps if steps else float("nan"),
             "tokens_per_step": len(new) / (steps + 1), "drafts": np.asarray(drafts)[:len(new)]}
    return new, stats


# --------------------------------------------------------------------------------------------------------------
# Loading and the command line
# --------------------------------------------------------------------------------------------------------------
def load_run(run_dir: str, step: Optional[int] = None):
    """A training run's directory (experiments.run: config.json + checkpoints/<step>/{state,data,meta}) ->
    (cfg, {"params", "router"}, tokenizer spec, step). The model config and tokenizer come from the checkpoint's
    meta item; the state is restored without a target (only params and router are kept) and their content
    checksums verified. Without ``step``, a corrupt newest checkpoint is reported in one line and the previous
    one used, as the training loop does (but left in place: a reader does not rename a run's files)."""

    ckpt_dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"--checkpoint {run_dir}: no checkpoints/ directory (expected a training run's out_dir)")
    ck = Checkpointer(ckpt_dir, keep=1 << 30)  # keep: orbax prunes only on save, and this never saves
    try:
        steps = ck.steps()
        if not steps:
            raise ValueError(f"--checkpoint {run_dir}: checkpoints/ holds no complete step")
        if step is None:
            step, state, _, meta = ck.restore_latest(None, restore_fn=ck.restore_untargeted, move_aside=False)
        elif step not in steps:
            raise ValueError(f"--checkpoint {run_dir}: no step {step}; available {steps}")
        else:
            state, _, meta = ck.restore_untargeted(step)
    except CheckpointError as e:
        raise ValueError(f"--checkpoint {run_dir}: {e}") from None
    finally:
        ck.close()
    cfg = ModelConfig.from_dict(meta["model_config"])
    variables = {"params": state["params"], "router": state.get("router", {})}
    return cfg, variables, meta.get("config", {}).get("data.tokenizer", "byte"), step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepseek_jax.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run's out_dir (experiments.run); newest step unless --step")
    src.add_argument("--hf", help="a Hugging Face DeepSeek-V3 directory (config.json + safetensors)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step to load (--checkpoint)")
    ap.add_argument("--tokenizer", default=None,
                    help="'byte' or a tokenizer.json path/dir; default: the run's tokenizer (--checkpoint) or "
                         "DIR/tokenizer.json (--hf)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=None, help="cap on prompt + generated tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    ap.add_argument("--speculative", action="store_true",
                    help="MTP self-speculative decoding (greedy, one prompt); prints acceptance and speed-up")
    ap.add_argument("--dtype", default="float32", help="compute dtype (--hf: also the parameter dtype)")
    args = ap.parse_args(argv)
    compat.use_cpu_settings()  # before jax starts its backends (BUILD.md "CPU speed")


    if args.checkpoint:
        cfg, variables, tok_spec, step = load_run(args.checkpoint, args.step)
        cfg = cfg.replace(dtype=args.dtype)
        tok_spec = args.tokenizer or tok_spec
        print(f"loaded {args.checkpoint} step {step}", file=sys.stderr)
    else:
        cfg, variables = hf.load_pretrained(args.hf, dtype=args.dtype)
        tok_spec = args.tokenizer or args.hf
        if args.tokenizer is None and not os.path.isfile(os.path.join(args.hf, "tokenizer.json")):
            raise ValueError(f"--hf {args.hf}: no tokenizer.json there; pass --tokenizer (byte or a path)")
    tok = get_tokenizer(tok_spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_spec!r} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    prompts = [tok.encode(p) for p in args.prompt]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"--prompt {i}: {args.prompt[i]!r} encodes to no tokens")
    eos = None if args.no_eos else tok.eos_id

    def timed(fn):
        t0 = time.perf_counter()
        r = fn()
        return r, time.perf_counter() - t0

    if args.speculative:
        if len(prompts) != 1 or args.temperature != 0.0:
            raise ValueError("--speculative decodes one --prompt greedily (--temperature 0)")
        run_plain = lambda: generate(cfg, variables, prompts[0], args.max_new_tokens, eos_id=eos,
                                     max_len=args.max_len)
        run_spec = lambda: generate_speculative(cfg, variables, prompts[0], args.max_new_tokens, eos_id=eos,
                                                max_len=args.max_len)
        run_plain(), run_spec()  # compile both
        plain, t_plain = timed(run_plain)
        (spec, stats), t_spec = timed(run_spec)
        print(args.prompt[0] + tok.decode(spec))
        same = len(plain) == len(spec) and bool((plain == spec).all())
        print(f"[speculative] {len(spec)} tokens, acceptance {stats['acceptance_rate']:.3f} "
              f"({stats['drafts_accepted']}/{stats['verify_steps']}), {stats['tokens_per_step']:.2f} tokens per "
              f"main-model call; {len(spec) / t_spec:.1f} tokens/s vs plain greedy {len(plain) / t_plain:.1f} "
              f"tokens/s (x{t_plain / t_spec * len(spec) / max(len(plain), 1):.2f}); identical to plain greedy: "
              f"{same}", file=sys.stderr)
        return 0
    run = lambda: generate_batch(cfg, variables, prompts, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, args.seed, eos, args.max_len)
    new, t = timed(run)
    for text, toks in zip(args.prompt, new):
        print(text + tok.decode(toks))
        if len(prompts) > 1:
            print("-" * 40)
    print(f"[generate] {sum(len(n) for n in new)} new tokens in {t:.2f} s (compile included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
