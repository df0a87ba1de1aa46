"""The tiny run benchmarks/kill_resume.py kills and resumes (also a --config file for experiments.run): the
"tiny" preset (MLA, MoE with 8 routed experts, MTP depth 1), byte tokens, 12 steps of 4 x 32 tokens, a
checkpoint every 3 steps (keep 2), validation every 4, aux-loss-free bias updates on."""

import ml_collections

from deepseek_jax.train.run_config import parallel_fields
from deepseek_jax.train.step import default_train_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "tiny", "overrides": {"rope_scaling": None},
                                         "compute_dtype": "float32"})
    c.data = ml_collections.ConfigDict(dict(corpus="default", tokenizer="byte", seq_len=32, batch_size=4,
                                            fim_rate=0.1, val_fraction=0.05, seed=0))
    c.train = default_train_config(total_steps=12, peak_lr=1e-2, warmup_steps=2)
    c.train.balance.gamma = 0.01
    c.loop = ml_collections.ConfigDict(dict(out_dir="runs/kill_resume", seed=0, grad_accum=2, log_every=1,
                                            eval_every=4, eval_batches=2, ckpt_every=3, keep=2, overwrite=False,
                                            progress=False, sample_prompt="", sample_tokens=0, step_delay_s=0.0,
                                            max_skipped_fraction=0.05, **parallel_fields()))
    return c
