"""Reformer: LSH attention against dense references, its wiring into the models, reversible layers."""

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from transformer import masking, reformer
from transformer.attention import MultiHeadAttention

nn_unbox = flax.linen.meta.unbox

B, N, H = 2, 3, 8
VOCAB = 40


def inputs(seed, length, value_dim=H):
    """Shared queries/keys [B, T, N, H] and values [B, T, N, value_dim], float32 (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, length, N, H)).astype(np.float32),
            rng.normal(size=(B, length, N, value_dim)).astype(np.float32))


def dense_shared_qk_attention(query_key, value, attend):
    """The reference: softmax(q_i . k_j / sqrt(H)) over the keys with attend[b, n, i, j], k = q / ||q||, a
    token's own logit -1e5; zero output for a query that attends to nothing. attend [B, N or 1, T, T]."""
    length, head_dim = query_key.shape[1], query_key.shape[-1]
    key = query_key / jnp.linalg.norm(query_key, axis=-1, keepdims=True)
    logits = jnp.einsum("BTNH,BSNH->BNTS", query_key, key) / np.sqrt(head_dim)
    logits = jnp.where(jnp.eye(length, dtype=bool), -1e5, logits)
    weights = jax.nn.softmax(jnp.where(attend, logits, -1e9), axis=-1) * attend.any(-1, keepdims=True)
    return jnp.einsum("BNTS,BSNH->BTNH", weights, value)


def segment_causal_mask(segments, causal):
    """[B, 1, T, T]: same nonzero segment (and key <= query when causal)."""
    length = segments.shape[1]
    attend = (segments[:, None, :, None] == segments[:, None, None, :]) & (segments[:, None, None, :] != 0)
    return attend & np.tril(np.ones((length, length), bool)) if causal else attend


SEGMENTS_12 = np.array([[1] * 9 + [0] * 3, [1] * 5 + [2] * 7])  # padding; two packed sequences


@pytest.mark.parametrize("causal, num_hashes", [pytest.param(False, 1, marks=pytest.mark.slow), (True, 3)])
def test_one_bucket_equals_full_shared_qk_attention(causal, num_hashes):
    # bucket_size >= T: one chunk and one bucket, so every round sees every key. With 3 rounds each key
    # is found 3 times, and counting it once gives full attention again.
    query_key, value = inputs(0, 12)
    weights = np.cos(np.arange(H))  # a loss that weighs the output channels differently

    def lsh(query_key, value):
        out = reformer.lsh_attention(query_key, value, rng=jax.random.key(1), num_hashes=num_hashes, bucket_size=16,
                                     causal=causal, segment_ids=SEGMENTS_12)
        return jnp.sum(out * weights), out

    def full(query_key, value):
        out = dense_shared_qk_attention(query_key, value, segment_causal_mask(SEGMENTS_12, causal))
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(lsh, argnums=(0, 1), has_aux=True))(query_key, value)
    (_, expected), expected_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(query_key, value)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


def union_of_rounds_mask(query_key, rotations, segments, bucket_size, causal):
    """[B, N, T, T] bool, computed densely in numpy: i attends to j if in some round they share a bucket
    and j's chunk of the (bucket, position) order is i's or the one before; padding buckets last."""
    query_key, rotations, segments = np.asarray(query_key), np.asarray(rotations), np.asarray(segments)
    batch, length, heads, _ = query_key.shape
    num_buckets = 2 * rotations.shape[-1]
    padded = -(-length // bucket_size) * bucket_size
    attend = np.zeros((batch, heads, length, length), bool)
    for b in range(batch):
        for n in range(heads):
            for r in range(rotations.shape[2]):
                rotated = query_key[b, :, n] @ rotations[n, :, r]  # [T, num_buckets / 2]
                bucket = np.argmax(np.concatenate([rotated, -rotated], -1), -1)
                bucket = np.concatenate([np.where(segments[b] != 0, bucket, num_buckets),
                                         np.full(padded - length, num_buckets)])
                order = np.lexsort((np.arange(padded), bucket))  # by bucket, then position
                chunk = np.empty(padded, int)
                chunk[order] = np.arange(padded) // bucket_size
                i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
                attend[b, n] |= (bucket[i] == bucket[j]) & ((chunk[j] == chunk[i]) | (chunk[j] == chunk[i] - 1))
    return attend & segment_causal_mask(segments, causal)


def test_several_buckets_equal_softmax_over_the_union_of_rounds():
    # T = 21 (not a multiple of the bucket size 4: padded to 24, 12 buckets), 3 rounds, causal, packed and padded.
    length, bucket_size = 21, 4
    query_key, value = inputs(2, length)
    segments = np.array([[1] * 10 + [2] * 8 + [0] * 3, [1] * 21])
    assert reformer.num_buckets_for(length, bucket_size) == 12
    rotations = np.random.default_rng(3).normal(size=(N, H, 3, 6)).astype(np.float32)  # [N, H, R, 12 / 2]
    attend = union_of_rounds_mask(query_key, rotations, segments, bucket_size, causal=True)
    assert 0.1 < attend[:, :, 10:].mean() < 0.6  # neither every key nor only the token itself

    weights = np.sin(np.arange(H))

    def lsh(query_key, value):
        out = reformer.lsh_attention(query_key, value, rotations=rotations, bucket_size=bucket_size, causal=True,
                                     segment_ids=segments)
        return jnp.sum(out * weights), out

    def dense(query_key, value):
        out = dense_shared_qk_attention(query_key, value, attend)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(lsh, argnums=(0, 1), has_aux=True))(query_key, value)
    (_, expected), expected_grads = jax.jit(jax.value_and_grad(dense, argnums=(0, 1), has_aux=True))(query_key, value)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_weights_causality_and_padding_with_several_buckets():
    # Values = one-hot positions (then random channels), so out[..., :T] is each query's attention weights.
    length, t = 20, 10
    query_key, random_values = inputs(4, length)
    one_hot = np.broadcast_to(np.eye(length, dtype=np.float32)[:, None], (B, length, N, length))
    value = np.concatenate([one_hot, random_values], axis=-1)  # [B, T, N, T + H]
    segments = np.array([[1] * 14 + [0] * 6, [0] * 2 + [1] * 6 + [2] * 12])  # right and left padding, packed
    attend = jax.jit(functools.partial(reformer.lsh_attention, num_hashes=2, bucket_size=4, causal=True))
    out = attend(query_key, value, rng=jax.random.key(5), segment_ids=segments)  # [B, T, N, T + H]

    weights = np.asarray(out[..., :length].transpose(0, 2, 1, 3))  # [B, N, T, S]
    allowed = np.broadcast_to(segment_causal_mask(segments, causal=True), weights.shape)
    real = segments != 0  # [B, T]
    assert (weights >= 0).all()
    np.testing.assert_array_equal(weights[~allowed], 0.0)  # no later key, other sequence or padding
    np.testing.assert_allclose(weights.sum(-1).transpose(0, 2, 1)[real], 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[~real], 0.0)  # padding queries: no output
    np.testing.assert_allclose(weights[1, :, 8, 8], 1.0, atol=1e-6)  # a sequence's first token: only itself
    seen = (weights > 0).sum(-1)  # [B, N, T]: 10 buckets, so few of the earlier keys, but not only itself
    assert (seen[0, :, 13] < 14).all() and (seen[0, :, 1:14] > 1).mean() > 0.3

    # Padding: whatever its queries/keys and values, real outputs are unchanged.
    pad = (segments == 0)[:, :, None, None]
    noise_qk, noise_v = inputs(6, length, value_dim=length + H)
    changed = attend(np.where(pad, 10 * noise_qk, query_key), np.where(pad, noise_v, value), rng=jax.random.key(5),
                     segment_ids=segments)
    np.testing.assert_array_equal(changed, out)
    # Causal: later values do not change out[:, :t + 1], and no gradient reaches out[:, t] from later tokens.
    # NOTE: later queries/keys can move earlier keys between chunks (the sort), so out[:, t] may depend on
    # them (as in the Reformer); but not differentiably.
    later = np.arange(length)[None, :, None, None] > t
    changed = attend(query_key, np.where(later, noise_v, value), rng=jax.random.key(5), segment_ids=segments)
    np.testing.assert_array_equal(changed[:, :t + 1], out[:, :t + 1])
    assert not np.allclose(changed[:, t + 1:], out[:, t + 1:])
    at_t = (np.arange(length) == t)[None, :, None, None]
    grads = jax.jit(jax.grad(lambda q, v: jnp.sum(jnp.where(at_t, attend(q, v, rng=jax.random.key(5)), 0.0)),
                             argnums=(0, 1)))(query_key, value)
    for grad in grads:
        np.testing.assert_array_equal(grad[:, t + 1:], 0.0)
        assert np.abs(grad[:, :t + 1]).sum() > 0


# ---------------------------------------------------------------------------------------------
# attention="lsh" in MultiHeadAttention and the models.


def tiny(**overrides):
    base = dict(vocab_size=VOCAB, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                max_len=32)
    return tfm.ModelConfig.preset("tiny", **{**base, **overrides})


def tokens(seed, shape, low=1):
    return jnp.asarray(np.random.default_rng(seed).integers(low, VOCAB, size=shape), jnp.int32)


def test_lsh_multi_head_attention_shares_queries_and_keys():
    x = np.random.default_rng(12).normal(size=(2, 10, 32)).astype(np.float32)
    segments = np.array([[1] * 7 + [0] * 3, [1] * 10])
    mask = masking.SegmentMask(segments, segments, causal=True)
    layer = MultiHeadAttention(num_heads=4, head_dim=8, implementation="lsh", lsh_num_hashes=1, lsh_bucket_size=16,
                               use_bias=True)
    params = jax.jit(lambda x, mask: layer.init(jax.random.key(13), x, x, mask=mask))(x, mask)["params"]
    assert sorted(params) == ["out", "out_bias", "query", "query_bias", "value", "value_bias"]  # no W^K, b^K
    out = jax.jit(lambda params, x, mask: layer.apply({"params": params}, x, x, mask=mask))(params, x, mask)
    p = {name: np.asarray(nn_unbox(v)) for name, v in params.items()}
    query = np.einsum("BTD,DNH->BTNH", x, p["query"]) + p["query_bias"]
    value = np.einsum("BTD,DNH->BTNH", x, p["value"]) + p["value_bias"]
    attended = jax.jit(dense_shared_qk_attention)(query, value, segment_causal_mask(segments, causal=True))
    expected = np.einsum("BTNH,NHD->BTD", attended, p["out"]) + p["out_bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="self-attention with shared queries and keys"):
        layer.apply({"params": params}, x, x.copy(), mask=mask)


def decode_step_by_step(model, params, decoder_inputs, *prefix):
    """Logits [B, T, V] from one cached decoding step per position."""
    length = decoder_inputs.shape[1]
    cache = model.init(jax.random.key(0), *prefix, jnp.zeros_like(decoder_inputs), decode=True,
                       method=model.decode)["cache"]

    @jax.jit
    def step(cache, token):
        logits, mutated = model.apply({"params": params, "cache": cache}, *prefix, token, decode=True,
                                      method=model.decode, mutable=["cache"])
        return mutated["cache"], logits[:, 0]

    outputs = []
    for t in range(length):
        cache, logits = step(cache, decoder_inputs[:, t:t + 1])
        outputs.append(logits)
    return jnp.stack(outputs, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("model_cls, overrides", [
    (tfm.EncoderDecoder, dict(attention="lsh", lsh_num_hashes=1, lsh_bucket_size=8)),
    (tfm.DecoderOnly, dict(attention="lsh", lsh_num_hashes=2, lsh_bucket_size=8, reversible=True,
                           norm_position="pre", position="rope")),
])
def test_cached_decoding_matches_the_full_forward(model_cls, overrides):
    # Decoding steps attend over the whole cache (full shared-QK attention), which is what LSH
    # attention computes when the sequence fits one chunk. Encoder-decoder attention keeps its W^K.
    model = model_cls(tiny(**overrides))
    source, targets = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]]), tokens(14, (2, 7))
    args = (source, targets) if model_cls is tfm.EncoderDecoder else (targets,)
    params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert not any("['self_attention']['key']" in name for name in names)  # shared QK
    full = jax.jit(model.apply)({"params": params}, *args)
    if model_cls is tfm.EncoderDecoder:
        assert any("['cross_attention']['key']" in name for name in names)
        encoded = model.apply({"params": params}, source, method=model.encode)
        stepped = decode_step_by_step(model, params, tfm.shift_right(targets), encoded, source)
    else:
        stepped = decode_step_by_step(model, params, tfm.shift_right(targets))
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lsh_rotations_come_from_the_lsh_rng_stream():
    model = tfm.DecoderOnly(tiny(attention="lsh", lsh_bucket_size=4, dropout_rate=0.0))
    targets = tokens(15, (2, 16))
    params = jax.jit(model.init)(jax.random.key(0), targets)["params"]
    apply = jax.jit(lambda rngs: model.apply({"params": params}, targets, rngs=rngs))
    fixed = apply({})
    np.testing.assert_array_equal(apply({}), fixed)  # no 'lsh' rng: fixed rotations per layer
    first, second = apply({"lsh": jax.random.key(1)}), apply({"lsh": jax.random.key(2)})
    np.testing.assert_array_equal(apply({"lsh": jax.random.key(1)}), first)
    assert not np.allclose(first, second, atol=1e-4)  # fresh hashes, other keys attended


# ---------------------------------------------------------------------------------------------
# Reversible layers.


def plain_sequence(functions, params, x1, x2, context, rngs):
    """The same steps as reformer.reversible_sequence, differentiated by ordinary autodiff."""
    for f, p, r in zip(functions, params, rngs):
        x1, x2 = x2, x1 + f(p, x2, context, r)
    return x1, x2


def test_reversible_sequence_gradients_equal_autodiff():
    rng = np.random.default_rng(16)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    params = [dict(w=rng.normal(size=(6, 6)).astype(np.float32) / 2) for _ in range(5)]
    context = dict(scale=rng.normal(size=(6,)).astype(np.float32), index=np.arange(5), key=jax.random.key(7))

    def f(p, h, context, rng):  # reads float and int context, and a "dropout" mask made from its rng
        keep = (jnp.arange(h.size).reshape(h.shape) + jax.random.key_data(rng)[-1]) % 4 != 0
        return jnp.tanh(h @ p["w"] * context["scale"] + context["index"][:, None]) * keep

    functions, rngs = [f] * 5, [jax.random.key(i) for i in range(5)]

    def loss(sequence, params, x, scale):
        a, b = sequence(functions, params, x, x, dict(context, scale=scale), rngs)
        return jnp.sum(jnp.sin(a) * b)

    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, reformer.reversible_sequence),
                                              argnums=(0, 1, 2)))(params, x, context["scale"])
    expected_value, expected = jax.jit(jax.value_and_grad(functools.partial(loss, plain_sequence),
                                                          argnums=(0, 1, 2)))(params, x, context["scale"])
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for grad, expected_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


LSH = dict(attention="lsh", lsh_bucket_size=4, position="rope")


@pytest.mark.slow  # 10-20 s each on 2 CPU cores; test_reversible_sequence_gradients_equal_autodiff is the fast one
@pytest.mark.parametrize("model_cls, overrides", [
    (tfm.EncoderOnly, dict(attention="reference")),
    (tfm.DecoderOnly, LSH),
    (tfm.EncoderDecoder, LSH),  # the encoder output: a gradient through the decoder's context
])
def test_reversible_models_match_the_same_stack_without_recomputation(model_cls, overrides, monkeypatch):
    # Dropout on, so the recomputation must reproduce every layer's masks (and LSH rotations).
    cfg = tiny(reversible=True, norm_position="pre", num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.2,
               attention_dropout_rate=0.1, **overrides)
    model = model_cls(cfg)
    x = tokens(17, (2, 9))
    args = (x, tokens(18, (2, 8))) if model_cls is tfm.EncoderDecoder else (x,)
    params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
    rngs = {"dropout": jax.random.key(1), "lsh": jax.random.key(2)}

    def loss(params):
        logits = model.apply({"params": params}, *args, rngs=rngs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.cos(logits[..., 0])), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    monkeypatch.setattr(reformer, "reversible_sequence", plain_sequence)
    (expected_value, expected_logits), expected = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(value, expected_value, atol=1e-6, rtol=1e-5)

    def check(path, grad, expected_grad):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, grads, expected)


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_reversible_memory_stays_flat_as_depth_grows():
    # Wide sub-layers on a small weight: activations dominate. The ordinary backward pass keeps every
    # step's activations ([B, T, F] each); the reversible one keeps two halves and one step's work.
    x = jnp.ones((8, 256, 16))

    def f(p, h, context, rng):
        return jnp.tanh(jnp.tanh(h @ p["w_in"]) @ p["w_out"])

    def grad_fn(depth, sequence):
        params = [dict(w_in=jnp.full((16, 512), 0.01), w_out=jnp.full((512, 16), 0.01))] * depth

        def loss(params, x):
            a, b = sequence([f] * depth, params, x, x, {}, [None] * depth)
            return jnp.sum(a * b)
        return lambda x: jax.grad(loss, argnums=(0, 1))(params, x)

    reversible = [temp_bytes(grad_fn(depth, reformer.reversible_sequence), x) for depth in (2, 8)]
    plain = [temp_bytes(grad_fn(depth, plain_sequence), x) for depth in (2, 8)]
    activation = 8 * 256 * 512 * 4  # one step's [B, T, F] float32
    assert reversible[1] < reversible[0] + activation, (reversible, plain)
    assert plain[1] > plain[0] + 4 * activation, (reversible, plain)


@pytest.mark.slow
def test_reversible_encoder_memory_stays_flat_as_depth_grows():
    # The model itself: attention [B, N, T, T] and feed-forward activations per layer dominate its weights.
    x = tokens(19, (4, 128))

    def grad_fn(depth, reversible):
        cfg = tiny(norm_position="pre", num_encoder_layers=depth, reversible=reversible, dropout_rate=0.0,
                   max_len=128, d_ff=1024)
        model = tfm.EncoderOnly(cfg)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
        return functools.partial(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x))), params)

    reversible = [temp_bytes(grad_fn(depth, True), x) for depth in (2, 8)]
    plain = [temp_bytes(grad_fn(depth, False), x) for depth in (2, 8)]
    attention = 4 * 4 * 128 * 128 * 4  # one layer's [B, N, T, T] float32 weights
    assert reversible[1] < reversible[0] + attention, (reversible, plain)
    assert plain[1] > plain[0] + 6 * attention, (reversible, plain)

