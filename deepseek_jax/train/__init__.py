"""Training: optimizer and schedules (optimizer.py), losses (losses.py), the pure train/eval steps (step.py).

The driver (loop.py) builds on ``make_train_step`` / ``make_eval_step`` / ``init_train_state`` and a train config
from ``default_train_config``.
"""

from deepseek_jax.train.losses import (cross_entropy, max_vio, mtp_loss, mtp_targets, sequence_balance_loss,
                                       sequence_balance_terms)
from deepseek_jax.train.optimizer import (batch_size_at, decay_mask, gamma_schedule, lambda_schedule, lr_schedule,
                                          make_optimizer, paper_lr_phases, paper_lr_schedule, scale_by_adam_bf16,
                                          schedule_from_config)
from deepseek_jax.train.step import (TrainState, bias_update, default_train_config, init_train_state,
                                     make_eval_step, make_train_step, paper_schedule_fields, schedules_from_config,
                                     update_router_bias, validate_train_config)
