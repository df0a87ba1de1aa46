"""The DeepSeek-V3 Transformer: embedding -> scanned dense blocks -> scanned MoE blocks -> norm -> head, plus
the MTP modules (V3 §2, Fig. 2-3).

``Transformer(cfg).apply(variables, tokens)`` returns ``ModelOutput(logits, mtp_logits, aux, ...)``. Variables
are ``{"params": ..., "router": ...}``; the "router" collection holds the aux-loss-free bias b of every MoE layer
(non-trainable, outside the optimizer). Identical blocks are stacked with ``nn.scan`` (one compiled body, a
leading "layers" axis on every parameter) and optionally rematerialised with a named policy.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.ops.fp8 import dot_general_for as fp8_dot_general
from deepseek_jax.layers.attention import attention_class
from deepseek_jax.layers.linear import Dense, dtype_of
from deepseek_jax.layers.moe import MLP, MoE
from deepseek_jax.layers.mtp import MTPModule
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.router import LOAD_COLLECTION

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class ModelOutput:
    """logits [B, T, V]; mtp_logits: tuple of D arrays, the k-th [B, T-k, V] predicting token i+k+1 from
    position i (empty when decoding with a cache); hidden: final normed hidden state [B, T, d] (h^0 of MTP);
    aux: {"moe": {"load" [L_moe, E], "seq_counts" [L_moe, B, E], "seq_probs" [L_moe, B, E]},
          "mtp": same keys stacked over the D MTP modules}; cache: the updated latent cache or None."""

    logits: jax.Array
    mtp_logits: Tuple[jax.Array, ...]
    aux: Dict[str, Any]
    hidden: jax.Array
    cache: Optional[Dict[str, Any]] = None


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)) (or MHA/GQA when ``cfg.attention`` says so); x + FFN(norm(x))
    where FFN is MoE or dense (SwiGLU).
    Scan-shaped: (x, positions, cache) -> (x, (aux, cache))."""

    cfg: ModelConfig
    moe: bool
    absorb: bool = False
    dot_general: Optional[object] = None
    dispatch: Optional[object] = None  # the MoE dispatch strategy (layers/moe.py); None = local

    @nn.compact
    def __call__(self, x_btd, positions_bt, cache=None):
        cfg = self.cfg
        # The FP8-eligible GEMMs' policy: an explicit dot_general, else the one cfg.fp8 asks for (None = plain).
        dot_general = self.dot_general if self.dot_general is not None else fp8_dot_general(cfg.fp8)
        h, new_cache = attention_class(cfg)(cfg, dot_general, name="attn")(
            RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="attn_norm")(x_btd), positions_bt, cache,
            absorb=self.absorb)
        x_btd = x_btd + h
        y = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="mlp_norm")(x_btd)
        if self.moe:
            y, aux = MoE(cfg, dot_general, self.dispatch, name="mlp")(y)
        else:
            y, aux = MLP(cfg, cfg.intermediate_size, dot_general, name="mlp")(y), {}
        return x_btd + y, (aux, new_cache)


def _block_class(cfg: ModelConfig):
    if cfg.remat_policy != "none":
        return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    return Block


def _block_stack(cfg: ModelConfig, moe: bool, n: int, absorb: bool, dot_general, dispatch, name: str):
    cls = _block_class(cfg)
    unroll = n if cfg.scan_unroll == 0 else min(cfg.scan_unroll, n)  # ModelConfig.scan_unroll
    scanned = nn.scan(cls, variable_axes={"params": 0, "router": 0, LOAD_COLLECTION: 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, 0), length=n, unroll=unroll,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe=moe, absorb=absorb, dot_general=dot_general, dispatch=dispatch, name=name)


def check_tokens(tokens, vocab_size: int) -> None:
    """Raise ValueError for ids outside [0, vocab_size) when the ids are concrete (JAX gathers clamp silently).
    Under tracing the embedding lookup fills out-of-range rows (negative ids included: ``jnp.take`` would wrap
    -1 to V-1) with NaN instead, so a bad id poisons the loss loudly rather than silently reading another
    token's row."""
    try:
        t = np.asarray(tokens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: values unknown until run time
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens: integer token ids expected, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t[(t < 0) | (t >= vocab_size)]
        raise ValueError(f"tokens: ids must be in [0, vocab_size={vocab_size}); found {bad.size} out of range, "
                         f"e.g. {bad.ravel()[:5].tolist()}")


def check_positions(positions, max_positions: int) -> None:
    """Raise ValueError for positions outside [0, max_position_embeddings) when they are concrete; traced ones
    are poisoned in ``Transformer`` (NaN hidden states), like out-of-range token ids."""
    try:
        p = np.asarray(positions)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if p.size and (p.min() < 0 or p.max() >= max_positions):
        raise ValueError(f"positions: must be in [0, max_position_embeddings={max_positions}); got "
                         f"{int(p.min())}..{int(p.max())}")


class Embed(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_bt):
        cfg = self.cfg
        table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size),
            dtype_of(cfg.param_dtype))
        # every out-of-range id -> row V (out of bounds: NaN); jnp.take alone would wrap negatives to V + id
        ids = jnp.where((tokens_bt >= 0) & (tokens_bt < cfg.vocab_size), tokens_bt, cfg.vocab_size)
        out = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
        return out.astype(dtype_of(cfg.dtype))


class Transformer(nn.Module):
    """stacked=False builds one Block per layer ("dense_layers_0", ..., "moe_layers_0", ...) instead of the
    scanned stacks: the same function on the variables of :func:`unstack_layers`, with the cache as a tuple of
    per-layer dicts (:func:`unstack_cache`). generate.py decodes with it: in a decode loop a scanned stack slices
    (copies) every layer's weights out of the stacked arrays at every step, while per-layer arrays are sliced once,
    before the loop (at batch 8 on the decode benchmark's model the copies cost about a third of a step)."""

    cfg: ModelConfig
    dot_general: Optional[object] = None  # precision policy for the FP8-eligible projections
    stacked: bool = True
    dispatch: Optional[object] = None  # MoE dispatch strategy (layers/moe.py); None = local, from cfg

    @nn.compact
    def __call__(self, tokens_bt: jax.Array, positions_bt: Optional[jax.Array] = None,
                 cache: Optional[Dict[str, Any]] = None, absorb: Optional[bool] = None) -> ModelOutput:
        """tokens [B, T] int. positions default to 0..T-1. With ``cache`` (from generate.init_cache) the new
        latents are written at ``positions`` and attention runs over the cache (absorbed path by default);
        MTP is skipped then. MTP runs when there is no cache and T > D (init with T > D to create its params)."""
        cfg = self.cfg
        check_tokens(tokens_bt, cfg.vocab_size)
        B, T = tokens_bt.shape
        if positions_bt is None:
            if T > cfg.max_position_embeddings:
                raise ValueError(f"tokens: sequence length {T} exceeds max_position_embeddings="
                                 f"{cfg.max_position_embeddings}")
            positions_bt = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
        else:
            check_positions(positions_bt, cfg.max_position_embeddings)
        if absorb is None:
            absorb = cache is not None
        embed = Embed(cfg, name="embed")
        x = embed(tokens_bt)
        pos_ok = (positions_bt >= 0) & (positions_bt < cfg.max_position_embeddings)  # traced positions: poison
        x = jnp.where(pos_ok[..., None], x, jnp.asarray(jnp.nan, x.dtype))
        new_cache = {} if cache is not None else None
        aux = {}
        for kind, n, moe in (("dense", cfg.num_dense_layers, False), ("moe", cfg.num_moe_layers, True)):
            if n == 0:
                continue
            if self.stacked:
                stack = _block_stack(cfg, moe, n, absorb, self.dot_general, self.dispatch, f"{kind}_layers")
                x, (aux_k, cache_k) = stack(x, positions_bt, None if cache is None else cache[kind])
            else:
                auxs, caches = [], []
                for i in range(n):
                    block = _block_class(cfg)(cfg, moe=moe, absorb=absorb, dot_general=self.dot_general,
                                              dispatch=self.dispatch, name=f"{kind}_layers_{i}")
                    x, (a, c) = block(x, positions_bt, None if cache is None else cache[kind][i])
                    auxs.append(a)
                    caches.append(c)
                aux_k = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *auxs)
                cache_k = tuple(caches)
            if moe:
                aux["moe"] = aux_k
            if cache is not None:
                new_cache[kind] = cache_k
        hidden = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="final_norm")(x)
        head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                     name="lm_head")
        logits = head(hidden)

        mtp_logits = []
        D = cfg.num_nextn_predict_layers
        if cache is None and D > 0 and T > D:
            h_prev, mtp_aux = hidden, []
            for k in range(1, D + 1):
                h_k, normed_k, aux_k = MTPModule(cfg, _block_class(cfg), cfg.num_hidden_layers + k - 1,
                                                 self.dot_general, self.dispatch, name=f"mtp_{k - 1}")(
                    h_prev[:, :T - k], embed(tokens_bt[:, k:]), positions_bt[:, :T - k])
                mtp_logits.append(head(normed_k))
                mtp_aux.append(aux_k)
                h_prev = h_k
            if mtp_aux and mtp_aux[0]:
                aux["mtp"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *mtp_aux)
        return ModelOutput(logits=logits, mtp_logits=tuple(mtp_logits), aux=aux, hidden=hidden, cache=new_cache)


def unstack_layers(variables, cfg: ModelConfig):
    """The variables of ``Transformer(cfg, stacked=False)`` from those of the scanned model: every collection's
    "{kind}_layers" stack [L, ...] becomes L subtrees "{kind}_layers_{i}" (the other entries are shared)."""
    out = {}
    for col, tree in variables.items():
        tree = dict(tree)
        for kind, n in (("dense", cfg.num_dense_layers), ("moe", cfg.num_moe_layers)):
            stack = tree.pop(f"{kind}_layers", None)
            if stack is not None:
                for i in range(n):
                    tree[f"{kind}_layers_{i}"] = jax.tree_util.tree_map(lambda a: a[i], stack)
        out[col] = tree
    return out


def unstack_cache(cache: Dict[str, Any]) -> Dict[str, Tuple[Any, ...]]:
    """A stacked latent cache ({kind: {name: [L, ...]}}) as {kind: (layer 0's {name: [...]}, ...)}."""
    return {kind: tuple(jax.tree_util.tree_map(lambda a: a[i], c)
                        for i in range(jax.tree_util.tree_leaves(c)[0].shape[0]))
            for kind, c in cache.items()}


def init(cfg: ModelConfig, rng: jax.Array, seq_len: Optional[int] = None, unbox: bool = True):
    """Initialise variables {"params", "router"} (plain arrays when ``unbox``)."""
    seq_len = seq_len or cfg.num_nextn_predict_layers + 2
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = jax.jit(Transformer(cfg).init)(rng, tokens)  # jitted: eager init of a scanned model is slow
    return nn.meta.unbox(variables) if unbox else variables


def abstract_variables(cfg: ModelConfig):
    """Shapes and dtypes of every variable, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))


def count_params(cfg: ModelConfig) -> Dict[str, int]:
    """Parameter counts from eval_shape (nothing is allocated, even for the 671B preset):

    total      the main model, embedding and output head included (V3: 671B);
    activated  the parameters one token's forward pass multiplies by: total minus the routed experts it does
               not use, and minus the input embedding (a table lookup, not a matmul). This is the convention
               that reproduces all three published figures: V3 37B, V2 21B, V2-Lite 2.4B (counting the embedding
               too would give 2.7B for V2-Lite);
    mtp        the MTP modules' own parameters; embedding and head are shared, so not counted again (V3: 11.5B).
    """
    params = abstract_variables(cfg)["params"]
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    mtp = size({k: v for k, v in params.items() if k.startswith("mtp_")})
    total = size({k: v for k, v in params.items() if not k.startswith("mtp_")})
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    embedding = cfg.vocab_size * cfg.hidden_size
    return {"total": total, "activated": total - inactive - embedding, "mtp": mtp}
