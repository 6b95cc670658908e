"""Sub-layers against flax's own: LayerNorm's values, gradients and parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import layers


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 128)])
def test_layer_norm_matches_flax_values_gradients_and_parameters(dtype, tolerance, shape):
    ours, theirs = layers.LayerNorm(epsilon=1e-5, dtype=dtype), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, size=shape), dtype)  # an offset mean, as residual sums have
    params = nn.meta.unbox(ours.init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
    axes = nn.get_partition_spec(ours.init(jax.random.key(0), x))["params"]
    assert axes == {"scale": jax.sharding.PartitionSpec("embed"), "bias": jax.sharding.PartitionSpec("embed")}
    params = {"params": {"scale": jnp.asarray(rng.normal(1.0, 0.3, shape[-1]), jnp.float32),
                         "bias": jnp.asarray(rng.normal(0.0, 0.3, shape[-1]), jnp.float32)}}
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(module, params, x):
        y = module.apply(params, x)
        return jnp.sum(y.astype(jnp.float32) * weights), y

    (value, y), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(ours, params, x)
    (expected_value, expected_y), expected = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(
        theirs, params, x)
    assert y.dtype == dtype and grads[1].dtype == dtype and grads[0]["params"]["scale"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected_y, np.float32), atol=tolerance * 4)
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        np.testing.assert_allclose(a, e, atol=tolerance * np.abs(e).max(), rtol=tolerance)


@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("features", [128, 33])  # even: two elements per random word; odd: one
def test_dropout_keeps_the_asked_fraction_scaled_to_keep_the_mean(rate, features):
    x = jnp.full((512, 4, features), 2.0, jnp.float32)
    y = np.asarray(layers.dropout(jax.random.key(0), x, rate))
    kept = y != 0
    # ~65k-262k elements: the kept fraction's standard deviation is below 2e-3, the bound 5 of them.
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
    keep = round((1 - rate) * 2**16) / 2**16
    np.testing.assert_allclose(y[kept], 2.0 / keep, rtol=1e-6)  # E[y] = x exactly, for the rounded keep
    assert abs(keep - (1 - rate)) < 8e-6


def test_dropout_halves_of_a_word_are_independent():
    """Elements 2i and 2i+1 share a 32-bit word (its low and high 16 bits): both are kept with
    probability (1 - rate)^2, as independent masks are, and neither mask follows its neighbour."""
    rate = 0.5
    kept = np.asarray(layers.dropout(jax.random.key(1), jnp.ones((1024, 256)), rate)) != 0
    pairs = kept.reshape(-1, 2)
    n = len(pairs)
    assert abs(np.mean(pairs[:, 0] & pairs[:, 1]) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5 / np.sqrt(n)


def test_dropout_module_is_off_when_deterministic_or_rate_zero_and_keeps_dtype():
    x = jnp.ones((4, 8, 16), jnp.bfloat16)
    assert layers.Dropout(0.5).apply({}, x, deterministic=True) is x
    assert layers.Dropout(0.0).apply({}, x, deterministic=False) is x
    a = layers.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = layers.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert a.dtype == jnp.bfloat16 and set(np.unique(np.asarray(a, np.float32))) == {0.0, 2.0}
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the mask follows the rng
    with pytest.raises(ValueError, match="Dropout rate"):
        layers.dropout(jax.random.key(0), x, 1.0)
