"""Every attention kernel against a NumPy reference; the module's cache and grouped heads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import attention, masking
from transformer.config import ModelConfig

# Dense-mask kernels ("banded" takes a masking.SegmentMask with a window: tests/test_longformer.py; "lsh"
# is MultiHeadAttention's shared-QK kernel, not one of dot_product_attention's: tests/test_reformer.py).
IMPLEMENTATIONS = tuple(i for i in attention.IMPLEMENTATIONS if i not in ("splash", "banded", "lsh"))


def numpy_attention(q, k, v, mask, bias):
    """Loops over batch, heads and queries; a query with no visible key outputs zeros."""
    batch, q_len, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[2]
    mask = np.broadcast_to(mask, (batch, num_heads, q_len, k.shape[1]))
    bias = np.broadcast_to(bias, mask.shape)
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(batch):
        for n in range(num_heads):
            for t in range(q_len):
                keep = mask[b, n, t]
                if not keep.any():
                    continue
                scores = k[b, :, n // groups] @ q[b, t, n] / np.sqrt(head_dim) + bias[b, n, t]
                scores = np.where(keep, scores, -np.inf)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, t, n] = weights @ v[b, :, n // groups]
    return out


def make_inputs(seed=0, batch=2, q_len=5, kv_len=7, num_heads=4, num_kv_heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    mask = rng.random((batch, 1, q_len, kv_len)) > 0.3
    mask[0, 0, 2, :] = False  # a fully masked query row
    mask[1, 0, 4, :] = False
    bias = rng.normal(size=(batch, num_heads, q_len, kv_len)).astype(np.float32)
    return q, k, v, mask, bias


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_numpy_reference(implementation, num_kv_heads):
    q, k, v, mask, bias = make_inputs(num_kv_heads=num_kv_heads)
    expected = numpy_attention(q, k, v, mask, bias)
    out = attention.dot_product_attention(q, k, v, mask, bias, implementation=implementation, chunk_size=3)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert not np.any(out[0, 2]) and not np.any(out[1, 4]), "fully masked rows must be zero"


@pytest.mark.parametrize("implementation, kv_length", [("reference", 0), ("reference", 1), ("fused", 16),
                                                       ("chunked", 17), ("reference", 33), ("fused", 37)])
def test_kv_length_reads_only_the_written_keys(implementation, kv_length):
    # 37 keys: two blocks of 16 and a last block moved back to overlap the second. Keys past
    # kv_length hold garbage (huge values) that must not leak into the output.
    q, k, v, mask, bias = make_inputs(seed=kv_length, kv_len=37)
    k[:, kv_length:], v[:, kv_length:] = 1e6, 1e6
    expected = numpy_attention(q, k, v, mask & (np.arange(37) < kv_length), bias)
    attend = jax.jit(functools.partial(attention.dot_product_attention, implementation=implementation))
    out = attend(q, k, v, mask, bias, kv_length=jnp.asarray(kv_length))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_mask_or_bias(implementation):
    q, k, v, _, _ = make_inputs(seed=1)
    expected = numpy_attention(q, k, v, np.ones((1, 1, 1, 1), bool), np.zeros((1, 1, 1, 1)))
    out = attention.dot_product_attention(q, k, v, implementation=implementation, chunk_size=4)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
def test_gradients_match_reference(implementation):
    q, k, v, mask, bias = make_inputs(seed=2)

    def loss(impl, q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, bias, implementation=impl, chunk_size=3)
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

    expected = jax.grad(loss, argnums=(1, 2, 3))("reference", q, k, v)
    actual = jax.grad(loss, argnums=(1, 2, 3))(implementation, q, k, v)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_kv_heads, with_mask, batch", [(4, True, 2), (2, True, 2), (1, True, 2), (2, False, 2),
                                                            (2, True, 6), (1, False, 6)])
def test_fused_without_bias_on_cpu_has_its_own_gradient_and_matches(num_kv_heads, with_mask, batch):
    """On CPU, "fused" without a bias is `_softmax_attention` (a custom VJP, the jaxpr shows it):
    values against NumPy, gradients against autodiff of the reference kernel, float32 and bfloat16,
    fully masked rows included. Batch 6 takes the head-major copies' split path
    (`precision.copying_transpose`), batch 2 the plain transposes."""
    q, k, v, mask, _ = make_inputs(seed=5, batch=batch, num_kv_heads=num_kv_heads)
    mask = mask if with_mask else None
    jaxpr = str(jax.make_jaxpr(functools.partial(attention.dot_product_attention, implementation="fused"))(
        q, k, v, mask))
    assert "custom_vjp_call" in jaxpr
    visible = np.ones((1, 1, 1, 1), bool) if mask is None else mask
    expected = numpy_attention(q, k, v, visible, np.zeros((1, 1, 1, 1)))
    out = attention.dot_product_attention(q, k, v, mask, implementation="fused")
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    if with_mask:
        assert not np.any(out[0, 2]) and not np.any(out[1, 4]), "fully masked rows must be zero"

    def loss(impl, q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, implementation=impl)
        weights = jnp.arange(out.size).reshape(out.shape) / out.size - 0.5
        return jnp.sum(out.astype(jnp.float32) * weights)

    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        args = [jnp.asarray(x, dtype) for x in (q, k, v)]
        expected = jax.grad(loss, argnums=(1, 2, 3))("reference", *args)
        actual = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)("fused", *args)
        for e, a in zip(expected, actual):
            assert a.dtype == dtype
            e, a = np.asarray(e, np.float32), np.asarray(a, np.float32)
            np.testing.assert_allclose(a, e, atol=tolerance * np.abs(e).max(), rtol=tolerance)


@pytest.mark.parametrize("implementation", ["reference", "chunked"])
def test_dropout_keeps_expectation_and_zeroes_weights(implementation):
    """With one-hot values the output *is* the attention weights: dropout zeroes a `rate` fraction
    of them and scales the rest by 1 / (1 - rate), so their mean over many draws is the clean weights."""
    q, k, _, mask, bias = make_inputs(seed=3)
    batch, kv_len, num_kv_heads = k.shape[:3]
    v = np.broadcast_to(np.eye(kv_len, dtype=np.float32)[None, :, None, :], (batch, kv_len, num_kv_heads, kv_len))
    q = q[..., :kv_len] if q.shape[-1] >= kv_len else np.pad(q, ((0, 0),) * 3 + ((0, kv_len - q.shape[-1]),))
    k = k[..., :kv_len] if k.shape[-1] >= kv_len else np.pad(k, ((0, 0),) * 3 + ((0, kv_len - k.shape[-1]),))
    rate, draws = 0.5, 400
    run = functools.partial(attention.dot_product_attention, q, k, v, mask, bias, implementation=implementation,
                            chunk_size=4)
    clean = np.asarray(run())  # [B, T, N, S]: the weights
    dropped = np.asarray(jax.vmap(lambda key: run(dropout_rate=rate, dropout_rng=key))(
        jax.random.split(jax.random.key(0), draws)))  # [draws, B, T, N, S]
    visible = clean > 1e-6
    assert visible.sum() > 100
    zeroed = (dropped == 0.0)[:, visible].mean()
    assert abs(zeroed - rate) < 0.01, zeroed  # ~80k Bernoulli draws: the standard error is ~0.002
    kept = dropped[:, visible][dropped[:, visible] != 0]
    np.testing.assert_allclose(kept / np.broadcast_to(clean[visible], dropped[:, visible].shape)[dropped[:, visible] != 0],
                               1 / (1 - rate), rtol=1e-4)  # the survivors are scaled exactly
    mean = dropped.mean(axis=0)
    np.testing.assert_allclose(mean[visible], clean[visible], rtol=0.3, atol=0.02)  # each: ~5% standard error
    assert abs(mean[visible].sum() / clean[visible].sum() - 1) < 0.025  # in total: ~0.5% standard error
    np.testing.assert_array_equal(dropped[0], np.asarray(run(dropout_rate=rate, dropout_rng=jax.random.split(
        jax.random.key(0), draws)[0])))  # the same key, the same mask


def test_bad_shapes_raise():
    q, k, v, mask, bias = make_inputs()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention.dot_product_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="not broadcastable"):
        attention.dot_product_attention(q, k, v, mask[:, :, :2])
    with pytest.raises(ValueError, match="Unknown attention implementation"):
        attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16(implementation):
    q, k, v, mask, bias = make_inputs(seed=4)
    expected = numpy_attention(q, k, v, mask, bias)
    to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    out = attention.dot_product_attention(to_bf16(q), to_bf16(k), to_bf16(v), mask, bias,
                                          implementation=implementation, chunk_size=3)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.1)


def test_module_cache_reproduces_full_attention():
    """Feeding keys one step at a time through the cache equals causal attention over all of them."""
    module = attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, use_rope=True)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 16)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    variables = module.init(jax.random.key(0), x, x, mask=causal, query_positions=positions,
                            key_positions=positions, decode=True)
    params, cache = variables["params"], variables["cache"]
    assert cache["cached_key"].shape == (2, 6, 2, 8)
    full = module.apply({"params": params}, x, x, mask=causal, query_positions=positions, key_positions=positions)
    for t in range(6):
        step_mask = causal[:, :, t:t + 1]
        out, mutated = module.apply(
            {"params": params, "cache": cache}, x[:, t:t + 1], x[:, t:t + 1], mask=step_mask,
            query_positions=positions[:, t:t + 1], key_positions=positions[:, t:t + 1], decode=True,
            decode_index=t, mutable=["cache"])
        cache = mutated["cache"]
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The Pallas splash kernel (Pallas interpret mode on CPU) against the reference kernel.


def segment_inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim=16):
    q, k, v, _, _ = make_inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim)
    rng = np.random.default_rng(seed)
    q_seg = np.ones((batch, q_len), np.int32)
    k_seg = np.ones((batch, kv_len), np.int32)
    # Row 0: packed, three sequences then padding; row 1: one sequence then padding.
    cut = [q_len // 3, 2 * q_len // 3, q_len - 5]
    q_seg[0, cut[0]:cut[1]], q_seg[0, cut[1]:cut[2]], q_seg[0, cut[2]:] = 2, 3, 0
    q_seg[1, q_len - 9:] = 0
    if q_len == kv_len:
        k_seg = q_seg.copy()
    else:
        k_seg[1, kv_len - int(rng.integers(3, 9)):] = 0
    return q, k, v, jnp.asarray(q_seg), jnp.asarray(k_seg)


SPLASH_CASES = {
    # name: (q_len, kv_len, heads, kv heads, mask fields)
    "padded_packed_encoder": (128, 128, 2, 2, dict()),
    "causal_packed_decoder": (128, 128, 2, 2, dict(causal=True)),
    "causal_window_gqa": (128, 128, 4, 2, dict(causal=True, window=9)),
    "cross_attention_unaligned_lengths": (40, 56, 2, 1, dict(query_segments=None)),
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_matches_reference_values_and_gradients(case):
    q_len, kv_len, heads, kv_heads, fields = SPLASH_CASES[case]
    q, k, v, q_seg, k_seg = segment_inputs(7, 2, q_len, kv_len, heads, kv_heads)
    fields = dict(fields)
    if q_len != kv_len:  # cross attention: queries unpacked, keys padded
        q_seg = None
    segments = masking.SegmentMask(fields.pop("query_segments", q_seg), k_seg, **fields)
    cotangent = jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)

    def loss(implementation, q, k, v):
        out = attention.dot_product_attention(q, k, v, segments, implementation=implementation)
        return jnp.sum(out * cotangent), out

    (_, expected), expected_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("reference", q, k, v)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)(
        "splash", q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    if q_seg is not None:  # padding queries attend to nothing
        assert not np.any(np.asarray(out)[np.asarray(q_seg) == 0])
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


def test_splash_keeps_packed_sequences_apart():
    """A sequence's output does not change when the other sequences packed in its row do."""
    q, k, v, seg, _ = segment_inputs(9, 2, 128, 128, 2, 2)
    segments = masking.SegmentMask(seg, seg, causal=True)
    out = attention.dot_product_attention(q, k, v, segments, implementation="splash")
    other = np.asarray(seg)[0] != 2
    k2, v2 = np.array(k), np.array(v)
    k2[0, other], v2[0, other] = -k2[0, other] * 3.0, v2[0, other] + 5.0
    out2 = attention.dot_product_attention(q, k2, v2, segments, implementation="splash")
    inside = np.asarray(seg)[0] == 2
    np.testing.assert_allclose(np.asarray(out)[0, inside], np.asarray(out2)[0, inside], atol=1e-6)
    assert not np.allclose(np.asarray(out)[0, other & (np.asarray(seg)[0] != 0)],
                           np.asarray(out2)[0, other & (np.asarray(seg)[0] != 0)])


def test_splash_refuses_what_it_cannot_do():
    q, k, v, mask, bias = make_inputs()
    with pytest.raises(ValueError, match="splash.*SegmentMask"):
        attention.dot_product_attention(q, k, v, mask, implementation="splash")
    with pytest.raises(ValueError, match="splash.*bias"):
        attention.dot_product_attention(q, k, v, masking.SegmentMask(), bias, implementation="splash")
    with pytest.raises(ValueError, match="attention='splash'"):
        ModelConfig(attention="splash", position="alibi")


def test_splash_decoding_step_takes_the_reference_kernel():
    q, k, v, _, _ = make_inputs(q_len=5, kv_len=7)
    q = q[:, 4:5]
    step = masking.SegmentMask(causal=True, query_index=jnp.asarray([4]), key_index=jnp.arange(7))
    out = attention.dot_product_attention(q, k, v, step, implementation="splash")
    expected = attention.dot_product_attention(q, k, v, step.dense(1, 7), implementation="reference")
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_bfloat16_projection_bias_gradients_match_float32():
    """Biased projections in bfloat16 ([N, H] biases for Q/K/V, [D] for the output): the bias
    gradients have the parameters' shapes and match float32's to bfloat16 precision."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 6, 16)), jnp.float32)
    params = attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, use_bias=True).init(
        jax.random.key(0), x, x)["params"]
    params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))  # non-zero biases

    def grads(dtype):
        module = attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, use_bias=True, dtype=dtype)
        return jax.grad(lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x, x).astype(jnp.float32))))(params)

    want, got = grads(jnp.float32), grads(jnp.bfloat16)
    biases = [k for k in params if "bias" in k or k.startswith("b_")]
    assert biases, list(params)
    # One scale for all: the key bias's true gradient is zero (softmax ignores a shift shared by
    # every key), so bfloat16 leaves only rounding there.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    for name in params:
        assert got[name].dtype == jnp.float32 and got[name].shape == params[name].shape, name
        np.testing.assert_allclose(got[name], want[name], atol=0.03 * scale, err_msg=name)
