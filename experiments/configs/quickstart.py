"""Quickstart: a small DeepSeek-V3-shaped model trained on the built-in corpus (Python's own sources and docs)
on CPU in a few minutes. MLA with q compression, DeepSeekMoE (1 shared + 32 routed experts, top-4 in 4 groups of
which 2 are kept), a dense first layer, aux-loss-free balancing, MTP depth 1, byte-level tokens, FIM 0.1.

    python -m experiments.run --config=experiments/configs/quickstart.py
"""

import ml_collections

from deepseek_jax.train.step import default_train_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "small", "overrides": {}})
    c.data = ml_collections.ConfigDict(dict(corpus="default", tokenizer="byte", seq_len=256, batch_size=8,
                                            fim_rate=0.1, val_fraction=0.05, seed=0))
    total = 300
    c.train = default_train_config(total_steps=total, peak_lr=3e-3, warmup_steps=30)
    # A short run cannot afford the paper's gamma = 0.001 (tuned for 14.8T tokens): the bias must be able to
    # move by ~0.1 within a few hundred steps.
    c.train.balance.gamma = 0.001 * 10
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/quickstart", seed=0, grad_accum=1, log_every=10,
                                            eval_every=100, eval_batches=40, ckpt_every=100, keep=2,
                                            overwrite=False, progress=True,
                                            sample_prompt="def fibonacci(n):\n    ", sample_tokens=96))
    return c
