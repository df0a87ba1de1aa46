"""Quickstart: a small DeepSeek-V3-shaped model trained on the built-in corpus (corpus "default": the pinned
snapshot v1 of CPython 3.11.7's standard-library sources and docs, the same on every interpreter; "stdlib" would
read the running interpreter's own, which differs between Python versions) on CPU in a few minutes. MLA with q
compression, DeepSeekMoE (1 shared + 32 routed experts, top-4 in 4 groups of which 2 are kept), a dense first
layer, aux-loss-free balancing, MTP depth 1, byte-level tokens, FIM 0.1.

    python -m experiments.run --config=experiments/configs/quickstart.py
"""

import ml_collections

from deepseek_jax.train.run_config import parallel_fields
from deepseek_jax.train.step import default_train_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "small", "overrides": {}, "compute_dtype": "auto"})
    c.data = ml_collections.ConfigDict(dict(corpus="default", tokenizer="byte", seq_len=256, batch_size=8,
                                            fim_rate=0.1, val_fraction=0.05, seed=0))
    total = 270  # ~3.5-4 min on 2 cores, compilation included (BUILD.md "CPU speed")
    c.train = default_train_config(total_steps=total, peak_lr=1.5e-3, warmup_steps=20)
    # A short run cannot afford the paper's gamma = 0.001 (tuned for 14.8T tokens): at init the router sends
    # most tokens to a few experts (MaxVio ~7 with 32 experts), and the bias must undo that within ~100 steps.
    # (Measured: gamma 0.01 with lr 3e-3 left MaxVio_global at 3.2 after 160 steps; 0.05 with lr 1.5e-3: 2.5.)
    c.train.balance.gamma = 0.05
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/quickstart", seed=0, grad_accum=1, log_every=10,
                                            eval_every=60, eval_batches=16, ckpt_every=90, keep=2,
                                            overwrite=False, progress=True,
                                            sample_prompt="def fibonacci(n):\n    ", sample_tokens=96,
                                            max_skipped_fraction=0.05,
                                            **parallel_fields()))
    return c
