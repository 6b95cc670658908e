"""Positional encodings: the paper's formula, RoPE's relativity, T5 buckets, ALiBi slopes."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer import positional


def test_sinusoidal_equals_paper_formula():
    d_model = 16
    positions = np.array([[0, 1, 7, 50]])
    encoding = np.asarray(positional.sinusoidal(positions, d_model))
    assert encoding.shape == (1, 4, d_model)
    for t, pos in enumerate(positions[0]):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            np.testing.assert_allclose(encoding[0, t, 2 * i], math.sin(angle), atol=1e-6)
            np.testing.assert_allclose(encoding[0, t, 2 * i + 1], math.cos(angle), atol=1e-6)


def test_learned_positions_restart_with_explicit_positions():
    module = positional.LearnedPositionEmbedding(max_len=8, d_model=4)
    params = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    out = module.apply(params, jnp.array([[0, 1, 0]]))
    np.testing.assert_array_equal(out[0, 0], out[0, 2])
    assert not np.allclose(out[0, 0], out[0, 1])


def test_rope_scores_depend_only_on_offset():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)

    def score(q_pos, k_pos):
        rq = positional.apply_rope(q, jnp.array([[q_pos]]))
        rk = positional.apply_rope(k, jnp.array([[k_pos]]))
        return np.asarray(jnp.einsum("btnh,bsnh->bn", rq, rk))

    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score(0, 5), score(20, 25), rtol=1e-5, atol=1e-5)
    assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)
    # Rotation preserves the norm of every head's vector at every position, and position 0 is the identity.
    positions = jnp.array([[0], [1], [7], [1000]])
    rotated = positional.apply_rope(jnp.broadcast_to(q, (4, 1, 2, 8)), positions)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.broadcast_to(jnp.linalg.norm(q, axis=-1), (4, 1, 2)),
                               rtol=1e-5)
    assert not np.allclose(rotated[2], q, atol=1e-3)  # it did rotate
    np.testing.assert_allclose(positional.apply_rope(q, jnp.array([[0]])), q, atol=1e-6)


def test_relative_position_buckets_match_t5():
    relative = jnp.array([-200, -20, -3, -1, 0, 1, 3, 20, 200])
    bidirectional = positional.relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    # T5's formula worked by hand: 16 buckets per direction, the first 8 exact, then
    # 8 + floor(log(n / 8) / log(128 / 8) * 8), capped at 15; future keys (n < 0) add 16.
    # n = 20: 8 + floor(2.64) = 10.
    expected_bi = [15, 10, 3, 1, 0, 17, 19, 26, 31]
    np.testing.assert_array_equal(bidirectional, expected_bi)
    causal = positional.relative_position_bucket(relative, bidirectional=False, num_buckets=32, max_distance=128)
    # One direction, 32 buckets, 16 exact: n = 20 -> 16 + floor(log(20/16) / log(8) * 16) = 17.
    expected_causal = [31, 17, 3, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(causal, expected_causal)


def test_relative_bias_shape_and_sharing():
    module = positional.RelativePositionBias(num_heads=2, num_buckets=8, max_distance=16)
    pos = jnp.arange(5)[None]
    params = module.init(jax.random.key(0), pos, pos)
    bias = module.apply(params, pos, pos)
    assert bias.shape == (1, 2, 5, 5)
    # Same offset, same bias: a Toeplitz matrix per head.
    np.testing.assert_allclose(bias[0, :, 1, 0], bias[0, :, 4, 3])


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    slopes6 = positional.alibi_slopes(6)
    np.testing.assert_allclose(slopes6[:4], [2.0 ** (-2 * (i + 1)) for i in range(4)], rtol=1e-6)
    np.testing.assert_allclose(slopes6[4:], [2.0 ** -1, 2.0 ** -3], rtol=1e-6)
    pos = jnp.arange(3)[None]
    bias = positional.alibi_bias(pos, pos, num_heads=2)
    np.testing.assert_allclose(bias[0, 0], -0.0625 * np.abs(np.arange(3)[:, None] - np.arange(3)[None]))
