"""Dropout (paper, Sec. 5.4) with masks drawn bit for bit as `jax.random.bernoulli` draws them, faster on CPU.

JAX lowers the Threefry-2x32 hash behind `jax.random` to a 5-iteration loop on CPU (to keep compile
times short), and XLA's CPU backend then writes both [*shape] uint32 halves of the hash state to
memory at every iteration. A dropout mask of [64, 64, 128] took 2.3 ms that way, [32, 64, 2048]
32 ms (2026-12-01, a 2-core Xeon), where the same hash written out round by round, as XLA fuses it
into one pass, took 0.5 and 3.9 ms: dropout was ~19% of the Multi30k train step.

`bernoulli` computes exactly what `jax.random.bernoulli` computes for a Threefry key with
`jax_threefry_partitionable` on (JAX's default): the hash of each element's 64-bit index, its two
output words xor-ed, the top 23 bits made a float in [0, 1) and compared with p. So models, tests
and checkpoints see the same masks as with `flax.linen.Dropout`. Other key implementations, other
platforms (whose lowering is already unrolled) and arrays of 2**32 elements or more take
`jax.random.bernoulli` itself.

`masked` applies a mask so that its gradient reads it rather than hashing it a second time (on CPU:
3-4% of the Multi30k and base train steps, 2026-12-07), with the same values as JAX's gradient.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer import runtime

_jax_bernoulli = jax.random.bernoulli  # kept, so that patching jax.random cannot make this recurse

# Threefry-2x32 (Salmon et al. 2011, 20 rounds), as jax._src.random.threefry2x32 computes it.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key1, key2, x1, x2):
    """Threefry-2x32 of the counter pairs (x1, x2) under the key (key1, key2), rounds unrolled.

    All uint32; key words scalars, counters any shape. Returns the two output words.
    """
    ks = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _flat_index(shape):
    """uint32 [*shape]: each element's row-major index (< 2**32), from one iota per axis, as
    `jax._src.random.prng.iota_2x32_shape` builds it (so that sharded arrays partition)."""
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    index = jnp.zeros(shape, jnp.uint32)
    for axis, stride in enumerate(strides):
        if shape[axis] > 1:
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    return index


def _threefry_words(key):
    """The two uint32 words of a Threefry key (typed or raw), or None for another implementation."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(key)):
            return None
        key = jax.random.key_data(key)
    elif jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    if key.shape != (2,) or key.dtype != jnp.uint32:
        return None
    return key[0], key[1]


def bernoulli(key, p: float, shape) -> jax.Array:
    """`jax.random.bernoulli(key, p, shape)` (p a Python float): bool [*shape], the same bits."""
    shape = tuple(shape)
    words = _threefry_words(key)
    size = math.prod(shape)
    if (words is None or not shape or size >= 2**32 or not jax.config.jax_threefry_partitionable
            or jax.config.jax_enable_x64 or runtime.trace_platform() != "cpu"):
        return _jax_bernoulli(key, p, shape)
    high, low = jnp.zeros(shape, jnp.uint32), _flat_index(shape)
    bits1, bits2 = threefry2x32(words[0], words[1], high, low)
    mantissa = (bits1 ^ bits2) >> np.uint32(32 - 23)
    uniform = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
    return uniform < np.float32(p)


def apply(rng, x, rate: float):
    """x with each element zeroed with probability `rate` (< 1) and the rest scaled by 1 / (1 - rate)."""
    return masked(x, bernoulli(rng, 1.0 - rate, x.shape), 1.0 - rate)


def masked(x, keep, keep_prob: float):
    """`select(keep, x / keep_prob, 0)`: x [..., T, D], keep bool of x's shape.

    XLA's CPU fusion recomputes an element-wise mask inside each of its users, so JAX's own gradient
    of the select hashed every dropout mask twice, forward and backward (the Threefry hash is ~100
    integer operations an element). On CPU, where T is a multiple of 8, the mask is therefore kept
    packed, 8 positions a byte: a reduction, which XLA computes once and does not copy into its users,
    read by the forward select and by the gradient, which is JAX's (`select(keep, dy / keep_prob, 0)`)
    bit for bit. Elsewhere, the select itself.
    """
    if x.ndim < 2 or x.shape[-2] % 8 or runtime.trace_platform() != "cpu":
        return _kept_scaled(keep, x, keep_prob)
    return _masked_packed(x, keep, keep_prob)


def _kept_scaled(keep, x, keep_prob: float):
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


_BITS = np.arange(8, dtype=np.uint8)[:, None]  # bit k of a byte: position 8 * t + k of [..., T, D]


def _pack(keep):
    """bool [..., T, D] -> uint8 [..., T / 8, D]: bit k of byte [t, d] is keep[8 * t + k, d]."""
    bits = keep.reshape(*keep.shape[:-2], -1, 8, keep.shape[-1]).astype(jnp.uint8) << _BITS
    return jnp.sum(bits, axis=-2, dtype=jnp.uint8)  # over a major axis: 8 whole vectors or-ed, no shuffles


def _unpack(packed, shape):
    """uint8 [..., T / 8, D] -> bool [..., T, D], `_pack`'s inverse."""
    return ((packed[..., None, :] >> _BITS) & np.uint8(1)).astype(bool).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_packed(x, keep, keep_prob):
    return _kept_scaled(keep, x, keep_prob)


def _masked_packed_forward(x, keep, keep_prob):
    packed = _pack(keep)
    return _kept_scaled(_unpack(packed, x.shape), x, keep_prob), packed


def _masked_packed_backward(keep_prob, packed, dy):
    return _kept_scaled(_unpack(packed, dy.shape), dy, keep_prob), np.zeros(dy.shape, jax.dtypes.float0)


_masked_packed.defvjp(_masked_packed_forward, _masked_packed_backward)


class Dropout(nn.Module):
    """`flax.linen.Dropout` (same arguments, same masks and values), its mask from `bernoulli`."""

    rate: float
    broadcast_dims: tuple = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        broadcast = {d % inputs.ndim for d in self.broadcast_dims}
        shape = tuple(1 if d in broadcast else n for d, n in enumerate(inputs.shape))
        return masked(inputs, jnp.broadcast_to(bernoulli(rng, keep_prob, shape), inputs.shape), keep_prob)
