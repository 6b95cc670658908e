"""The long-context benchmark's Transformer-XL pattern (experiments.benchmarks.long_context.xl_segments)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import long_context
from transformer import attention


def test_xl_segments_equal_dense_attention_over_each_segment_and_the_one_before():
    batch, length, heads, head_dim, segment = 2, 12, 2, 8, 4
    shape = (batch, length, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = (j <= i) & (j // segment >= i // segment - 1)  # causal, own segment and the previous one only
    expected = attention.dot_product_attention(q, k, v, jnp.asarray(mask)[None, None], implementation="reference")
    np.testing.assert_allclose(long_context.xl_segments(q, k, v, segment=segment), expected, rtol=1e-5, atol=1e-5)

    # The memory is under stop-gradient: no gradient reaches an earlier segment's keys from a later query.
    grad = jax.grad(lambda k: long_context.xl_segments(q, k, v, segment=segment)[:, 2 * segment:].sum())(k)
    assert float(jnp.abs(grad[:, :2 * segment]).max()) == 0.0
    assert float(jnp.abs(grad[:, 2 * segment:]).max()) > 0.0
