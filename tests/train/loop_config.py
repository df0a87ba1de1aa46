"""A tiny training config for the loop tests (also loadable by experiments.run as a --config file)."""

import ml_collections

from deepseek_jax.train.run_config import parallel_fields
from deepseek_jax.train.step import default_train_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "tiny", "overrides": {"rope_scaling": None},
                                         "compute_dtype": "auto"})
    c.data = ml_collections.ConfigDict(dict(corpus="default", tokenizer="byte", seq_len=32, batch_size=4,
                                            fim_rate=0.1, val_fraction=0.05, seed=0))
    # The paper's batch-size ramp in miniature: 2 sequences (one micro-batch) until 256 tokens are seen, then 4.
    c.data.batch_ramp = ml_collections.ConfigDict(dict(start=2, tokens=256))
    c.train = default_train_config(total_steps=10, peak_lr=1e-2, warmup_steps=2)
    c.train.balance.gamma = 0.01
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/loop_test", seed=0, grad_accum=2, log_every=1,
                                            eval_every=5, eval_batches=2, ckpt_every=2, keep=2, overwrite=False,
                                            progress=False, sample_prompt="", sample_tokens=0,
                                            step_delay_s=0.0, max_skipped_fraction=0.05,
                                            **parallel_fields()))
    return c
