"""transformer.dropout: the masks of jax.random.bernoulli and flax's Dropout, bit for bit, by another route on CPU."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from transformer import dropout, sharding


def _has_loop(fn, *args) -> bool:
    """Whether fn lowers to a while loop: JAX's CPU lowering of its Threefry hash, which the CPU path avoids."""
    return "stablehlo.while" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("shape", [(64, 64, 128), (3, 5, 7), (1,), (2, 1, 9), (8, 1)])
@pytest.mark.parametrize("p", [0.8, 0.5, 0.1, 1 - 1e-6])
def test_bernoulli_is_jax_bernoulli_bit_for_bit(shape, p):
    for key in (jax.random.key(7), jax.random.PRNGKey(3), jax.random.fold_in(jax.random.key(1), 12)):
        ours = jax.jit(lambda k: dropout.bernoulli(k, p, shape))(key)
        np.testing.assert_array_equal(ours, jax.random.bernoulli(key, p, shape))
        assert ours.shape == shape and ours.dtype == jnp.bool_


def test_the_cpu_path_is_taken_and_draws_bernoulli_p():
    key = jax.random.key(0)
    assert not _has_loop(lambda k: dropout.bernoulli(k, 0.8, (256, 512)), key)
    assert _has_loop(lambda k: jax.random.bernoulli(k, 0.8, (256, 512)), key)
    mask = np.asarray(dropout.bernoulli(key, 0.8, (256, 512)))
    assert abs(mask.mean() - 0.8) < 4 * np.sqrt(0.8 * 0.2 / mask.size)  # 4 sigma
    # Different keys, different masks; neighbouring elements not copies of each other.
    other = np.asarray(dropout.bernoulli(jax.random.key(1), 0.8, (256, 512)))
    assert (mask != other).mean() > 0.25
    assert (mask[:, 1:] != mask[:, :-1]).mean() > 0.25


def test_other_key_implementations_take_jax_bernoulli():
    key = jax.random.key(5, impl="rbg")
    np.testing.assert_array_equal(dropout.bernoulli(key, 0.8, (16, 32)), jax.random.bernoulli(key, 0.8, (16, 32)))


def test_sharded_masks_are_the_unsharded_ones():
    mesh = sharding.make_mesh(data=-1)
    out = NamedSharding(mesh, P("data", None, None))
    key = jax.random.key(11)
    sharded = jax.jit(lambda k: dropout.bernoulli(k, 0.7, (16, 8, 32)), out_shardings=out)(key)
    assert sharded.sharding == out and len(sharded.addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(sharded, jax.random.bernoulli(key, 0.7, (16, 8, 32)))


@pytest.mark.parametrize("rate,broadcast_dims", [(0.2, ()), (0.5, (1,)), (0.3, (-1,)), (0.0, ()), (1.0, ())])
def test_dropout_module_is_flax_dropout(rate, broadcast_dims):
    x = jax.random.normal(jax.random.key(0), (4, 6, 8), jnp.bfloat16)
    rngs = {"dropout": jax.random.key(42)}
    ours = dropout.Dropout(rate, broadcast_dims=broadcast_dims).apply({}, x, deterministic=False, rngs=rngs)
    flax = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(ours, flax)
    assert ours.dtype == x.dtype
    np.testing.assert_array_equal(dropout.Dropout(rate).apply({}, x, deterministic=True), x)


def _grad_of_dropout(module, x, w):
    def loss(x):
        y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(42)})
        return jnp.sum(y.astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("shape,broadcast_dims", [((4, 16, 8), ()), ((2, 3, 8, 24), ()), ((4, 16, 8), (1,)),
                                                  ((4, 6, 8), ()), ((40,), ())])
def test_dropout_gradient_is_flax_dropouts_bit_for_bit(shape, broadcast_dims):
    # (4, 16, 8) and (2, 3, 8, 24) keep the mask packed for the gradient; 6 and 40 positions do not.
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), shape)
    ours = _grad_of_dropout(dropout.Dropout(0.2, broadcast_dims=broadcast_dims), x, w)(x)
    flax = _grad_of_dropout(nn.Dropout(0.2, broadcast_dims=broadcast_dims), x, w)(x)
    for a, b in zip(ours, flax):
        np.testing.assert_array_equal(a, b)
    assert ours[1].dtype == x.dtype


def test_masked_packs_eight_positions_a_byte_and_back():
    keep = jax.random.bernoulli(jax.random.key(3), 0.7, (3, 24, 16))
    packed = dropout._pack(keep)
    assert packed.shape == (3, 3, 16) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(dropout._unpack(packed, keep.shape), keep)
    np.testing.assert_array_equal(packed[1, 2, 5], sum(int(keep[1, 16 + k, 5]) << k for k in range(8)))


def _hash_passes(shape) -> int:
    """How many compiled computations of a dropout's value and gradient run the Threefry hash (its 20 rotations)."""
    x, w = jnp.ones(shape, jnp.bfloat16), jnp.ones(shape)
    text = _grad_of_dropout(dropout.Dropout(0.2), x, w).lower(x).compile().as_text()
    return sum(c.count("shift-left") >= 10 for c in re.split(r"\n(?=\S.*\{\n)", text))


def test_the_gradient_reads_the_mask_instead_of_hashing_it_again():
    assert _hash_passes((4, 16, 32)) == 1
    assert _hash_passes((4, 6, 32)) == 2  # 6 positions: not packed, XLA hashes in the forward and the backward
