"""The optimizer and its learning-rate schedule, from a validated `OptimizerConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax

from transformer import schedules
from transformer.run_config import OptimizerConfig


def make_schedule(opt: OptimizerConfig, *, d_model: int, total_steps: int) -> optax.Schedule:
    """The schedule `opt.schedule` names, built by `schedules.from_config` from the fields it reads."""
    return schedules.from_config(opt.schedule, **dataclasses.asdict(opt), d_model=d_model, total_steps=total_steps)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam (paper: beta1 0.9, beta2 0.98, eps 1e-9) with optional clipping and decoupled weight decay,
    and optionally a moving average of the parameters in its state (`opt.ema_decay`, `with_params_ema`).

    Weight decay skips biases and normalisation scales (parameters of rank 1).
    """
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.weight_decay:
        chain.append(optax.add_decayed_weights(opt.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    chain.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*chain)
    return with_params_ema(tx, opt.ema_decay) if opt.ema_decay else tx


class ParamsEmaState(NamedTuple):
    """The optimizer state of `with_params_ema`: the inner optimizer's, and the parameters' moving average."""

    inner: optax.OptState
    ema: Any  # a tree like the parameters (their dtype): the average after each update


def with_params_ema(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`inner`, keeping beside its state an exponential moving average of the parameters it produces.

    After each update, ema <- decay * ema + (1 - decay) * params (Polyak averaging in its exponential
    form), starting from the initial parameters: with decay d the average weighs the last
    ~1 / (1 - d) updates. The updates are `inner`'s, unchanged: training follows the same path
    with or without it. `ema_params(opt_state)` reads the average (for evaluation and export).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay}: the moving average needs 0 < decay < 1.")

    def init(params):
        return ParamsEmaState(inner.init(params), jax.tree.map(lambda p: p.copy(), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("with_params_ema needs the parameters: call update(updates, state, params).")
        updates, inner_state = inner.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: (e + (1.0 - decay) * (p - e)).astype(e.dtype), state.ema, new_params)
        return updates, ParamsEmaState(inner_state, ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: optax.OptState):
    """The moving average of the parameters that `with_params_ema` keeps in `opt_state`."""
    if not isinstance(opt_state, ParamsEmaState):
        raise ValueError("This optimizer state keeps no moving average of the parameters: train with "
                         "--config.optimizer.ema_decay=D (e.g. 0.999) to keep one.")
    return opt_state.ema
