"""Positional information: the paper's sinusoids, learned tables, RoPE, T5 relative bias, ALiBi.

Every function takes explicit integer positions, so packed rows (several sequences in one row)
restart each sequence at position 0. Two families:
  * absolute encodings added to the embeddings: `sinusoidal`, `LearnedPositionEmbedding`;
  * relative schemes applied inside attention: `apply_rope` rotates queries and keys,
    `RelativePositionBias` and `alibi_bias` return a [B, N, T, S] bias added to the attention logits.

Legend: B batch, T query length, S key length, N heads, H head dim, D model dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def sinusoidal(positions, d_model: int, max_timescale: float = 10_000.0):
    """The paper's encoding (Sec. 3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).

    Args:
      positions: [B, T] int.
    Returns:
      [B, T, D] float32, sines at even and cosines at odd channels, as in the paper's formula.
    """
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)  # [D/2]: the even channel indices 2i
    angles = positions[..., None].astype(jnp.float32) / max_timescale ** (two_i / d_model)  # [B, T, D/2]
    encoding = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, T, D/2, 2]
    return encoding.reshape(*positions.shape, -1)[..., :d_model]


class LearnedPositionEmbedding(nn.Module):
    """A learned table of absolute position embeddings (the paper's Table 3, row E)."""

    max_len: int
    d_model: int

    @nn.compact
    def __call__(self, positions):
        """[B, T] int -> [B, T, D] float32."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (self.max_len, self.d_model),
        )
        return jnp.take(table, positions, axis=0)


def apply_rope(x, positions, max_wavelength: float = 10_000.0):
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head.

    Args:
      x: [B, T, N, H] queries or keys, H even.
      positions: [B, T] int.
    Returns:
      [B, T, N, H] in x's dtype. The score q_t . k_s of rotated vectors depends on t - s only.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of key_position - query_position (Raffel et al. 2020).

    Small distances get their own bucket; larger ones share logarithmically wider buckets up to
    `max_distance`. Bidirectional buckets keep the sign; unidirectional ones (causal decoders) fold
    all future keys into bucket 0.
    """
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # NOTE: max(n, 1) keeps log finite; those entries take the is_small branch anyway.
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """T5-style learned bias per (relative-position bucket, head), shared by all layers of a stack."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True

    @nn.compact
    def __call__(self, query_positions, key_positions):
        """[B, T], [B, S] int -> bias [B, N, T, S] float32."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.1), (None, "heads")),
            (self.num_buckets, self.num_heads),
        )
        bias = jnp.take(table, buckets, axis=0)  # [B, T, S, N]
        return jnp.transpose(bias, (0, 3, 1, 2))


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ..."""

    def power_of_two_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two_slopes(num_heads), np.float32)
    # Non-powers of two: the slopes of the nearest lower power, then every other slope of the next one.
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two_slopes(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(power_of_two_slopes(lower) + extra, np.float32)


def alibi_bias(query_positions, key_positions, num_heads: int):
    """Linear distance penalty -slope_n * |t - s|: [B, T], [B, S] int -> [B, N, T, S] float32."""
    distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :]).astype(jnp.float32)  # [B, T, S]
    slopes = jnp.asarray(alibi_slopes(num_heads))[None, :, None, None]  # [1, N, 1, 1]
    return -slopes * distance[:, None, :, :]
