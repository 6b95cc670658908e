"""The optimizer chain: Adam with decoupled weight decay (AdamW) on the matrices only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import multi30k
from transformer import optimizers
from transformer.run_config import OptimizerConfig, TrainConfig

HOUR = TrainConfig.from_dict(multi30k.get_config("hour")).optimizer  # Adam's betas and eps as trained


def config(weight_decay: float = 0.0) -> OptimizerConfig:
    return dataclasses.replace(HOUR, learning_rate=0.01, weight_decay=weight_decay)


PARAMS = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0), "scale": jnp.full((4,), -1.0)}


def first_update(opt: OptimizerConfig, grads):
    tx = optimizers.make_optimizer(opt, optax.constant_schedule(opt.learning_rate))
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return updates


@pytest.mark.parametrize("weight_decay", [0.1, 0.5])
def test_weight_decay_shrinks_matrices_by_lr_times_decay_and_leaves_vectors_alone(weight_decay):
    """With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * p on rank >= 2."""
    zeros = {k: jnp.zeros_like(v) for k, v in PARAMS.items()}
    updates = first_update(config(weight_decay=weight_decay), zeros)
    np.testing.assert_allclose(updates["kernel"], -0.01 * weight_decay * PARAMS["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["scale"], 0.0)


def test_weight_decay_is_decoupled_from_adams_normalisation():
    """AdamW: the decay adds to Adam's normalised step (-lr * sign(g) on the first update), not to the gradient."""
    grads = {k: jnp.full_like(v, 1e-3) for k, v in PARAMS.items()}
    plain, decayed = first_update(config(), grads), first_update(config(weight_decay=0.1), grads)
    np.testing.assert_allclose(plain["kernel"], -0.01, rtol=1e-5)
    np.testing.assert_allclose(decayed["kernel"] - plain["kernel"], -0.01 * 0.1 * 2.0, rtol=1e-4)
    np.testing.assert_allclose(decayed["bias"], plain["bias"])


def test_moving_average_of_parameters_leaves_the_updates_alone_and_follows_its_recurrence():
    """ema <- d * ema + (1 - d) * params after each update, from the initial parameters; the updates
    (so training) are the inner optimizer's, bit for bit."""
    opt = dataclasses.replace(config(weight_decay=0.1), ema_decay=0.75)
    schedule = optax.constant_schedule(opt.learning_rate)
    plain, averaged = optimizers.make_optimizer(dataclasses.replace(opt, ema_decay=0.0), schedule), \
        optimizers.make_optimizer(opt, schedule)
    params, plain_state, state = PARAMS, plain.init(PARAMS), averaged.init(PARAMS)
    expected = PARAMS
    for i in range(3):
        grads = {k: jnp.full_like(v, 0.1 * (i + 1)) * jnp.sign(v) for k, v in PARAMS.items()}
        plain_updates, plain_state = plain.update(grads, plain_state, params)
        updates, state = averaged.update(grads, state, params)
        jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)
        params = optax.apply_updates(params, updates)
        expected = {k: 0.75 * expected[k] + 0.25 * params[k] for k in params}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), optimizers.ema_params(state), expected)
    assert not np.allclose(optimizers.ema_params(state)["kernel"], params["kernel"])  # it lags the parameters
    with pytest.raises(ValueError, match="ema_decay"):
        optimizers.ema_params(plain_state)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_ema_decay_outside_0_1_fails_in_the_config(decay):
    cfg = multi30k.get_config("hour")
    cfg.optimizer.ema_decay = decay
    with pytest.raises(ValueError, match="optimizer.ema_decay"):
        TrainConfig.from_dict(cfg)
