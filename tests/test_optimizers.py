"""The optimizer chain: Adam with decoupled weight decay (AdamW) on the matrices only."""

import dataclasses

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

