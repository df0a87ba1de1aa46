"""Parameter and KV-cache report for the presets, plus one forward pass of a small model.

    python -m deepseek_jax.info                     # all paper presets + forward of "small"
    python -m deepseek_jax.info --preset deepseek-v3-671b --forward tiny

Counts come from ``model.count_params`` (jax.eval_shape: nothing is allocated, even for 671B).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config, model

PAPER_PRESETS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite", "ablation-small-moe-15.7b")


def param_table(names) -> str:
    rows = ["| preset | total (B) | activated (B) | MTP unique (B) | KV cache elems/token (all layers) |",
            "|---|---:|---:|---:|---:|"]
    for name in names:
        cfg = config.preset(name)
        c = model.count_params(cfg)
        kv = cfg.kv_cache_elements_per_token_per_layer * cfg.num_hidden_layers
        rows.append(f"| {name} | {c['total'] / 1e9:.3f} | {c['activated'] / 1e9:.3f} | {c['mtp'] / 1e9:.3f} "
                    f"| {kv:,} |")
    return "\n".join(rows)


def forward_demo(name: str, batch: int = 2, seq: int = 64) -> None:
    cfg = config.preset(name)
    variables = model.init(cfg, jax.random.PRNGKey(0), seq_len=seq)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, cfg.vocab_size)
    net = model.Transformer(cfg)
    fwd = jax.jit(net.apply)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(variables, tokens))
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(variables, tokens))
    t_run = time.perf_counter() - t0
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    c = model.count_params(cfg)
    print(f"\nforward of preset {name!r} ({c['total'] / 1e6:.2f}M params, backend {jax.default_backend()}): "
          f"tokens {tuple(tokens.shape)} -> logits {tuple(out.logits.shape)}, "
          f"mtp_logits {[tuple(m.shape) for m in out.mtp_logits]}")
    print(f"  compile+run {t_compile:.2f}s, run {t_run * 1e3:.1f} ms; loss at init {float(nll):.4f} "
          f"(ln V = {np.log(cfg.vocab_size):.4f})")
    if "moe" in out.aux:
        load = np.asarray(out.aux["moe"]["load"])
        print(f"  expert load per MoE layer (tokens): {load.astype(int).tolist()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="preset(s) to count (default: the paper's)")
    p.add_argument("--forward", default="small", help="preset to run one forward pass of ('' to skip)")
    args = p.parse_args(argv)
    print(param_table(args.preset or PAPER_PRESETS))
    if args.forward:
        forward_demo(args.forward)


if __name__ == "__main__":
    main()
