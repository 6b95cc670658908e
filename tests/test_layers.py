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
