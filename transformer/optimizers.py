"""The optimizer and its learning-rate schedule, from a validated `OptimizerConfig`."""

from __future__ import annotations

import dataclasses

import jax
import optax

from transformer import schedules
from transformer.run_config import OptimizerConfig


def make_schedule(opt: OptimizerConfig, *, d_model: int, total_steps: int) -> optax.Schedule:
    """The schedule `opt.schedule` names, built by `schedules.from_config` from the fields it reads."""
    return schedules.from_config(opt.schedule, **dataclasses.asdict(opt), d_model=d_model, total_steps=total_steps)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam (paper: beta1 0.9, beta2 0.98, eps 1e-9) with optional clipping and decoupled weight decay.

    Weight decay skips biases and normalisation scales (parameters of rank 1).
    """
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.weight_decay:
        chain.append(optax.add_decayed_weights(opt.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain)
