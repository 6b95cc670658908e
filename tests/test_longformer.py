"""Longformer's banded attention (transformer.longformer) against the reference kernel on a mask built
by brute force: values and gradients, dilation, global tokens, packing; its O(T * window) cost; the
models with attention="banded" against the same models with the reference kernel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from transformer import attention, masking, steps

LENGTH = 13  # not a multiple of any window below


def brute_force_mask(q_seg, k_seg, *, causal, window, dilation, global_tokens, max_global_tokens):
    """[B, 1, T, S] bool from the definition, one (query, key) pair at a time."""
    batch, length = q_seg.shape
    glob = np.zeros((batch, length), bool) if global_tokens is None else np.array(global_tokens)
    for row in glob:  # only the first max_global_tokens of a row are global
        row[np.flatnonzero(row)[max_global_tokens or length:]] = False
    mask = np.zeros((batch, 1, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                local = abs(i - j) < window * dilation and (i - j) % dilation == 0
                mask[b, 0, i, j] = (q_seg[b, i] == k_seg[b, j] != 0 and (j <= i or not causal)
                                    and (local or glob[b, i] or glob[b, j]))
    return mask


def example(seed, num_heads, num_kv_heads, head_dim=8):
    """q [3, T, N, H], k, v [3, T, K, H]; segments [3, T]; global tokens [3, T].

    Row 0: two packed sequences, then padding; no global token. Row 1: one sequence, four global
    tokens (two adjacent, so one sits in the other's band; the fourth is past max_global_tokens=3).
    Row 2: one sequence, then padding; one global token.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(3, LENGTH, num_heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(3, LENGTH, num_kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    segments = np.ones((3, LENGTH), np.int32)
    segments[0, 6:], segments[0, 11:], segments[2, 9:] = 2, 0, 0
    glob = np.zeros((3, LENGTH), bool)
    glob[1, [2, 3, 8, 11]] = True
    glob[2, 5] = True
    return q, k, v, segments, glob


CASES = {
    # name: (causal, window, dilation, heads, kv heads, global tokens)
    "bidirectional_gqa": (False, 4, 1, 4, 2, True),
    "dilated_causal_gqa": (True, 2, 2, 4, 2, True),
    "window_past_the_length_mqa": (False, 16, 3, 2, 1, False),  # a whole residue class in one block
    "causal_mha": (True, 3, 1, 2, 2, True),
    "dilated_bidirectional_mqa": (False, 3, 2, 2, 1, True),
    "causal_no_global_tokens": (True, 5, 1, 2, 1, False),
}
SLOW_CASES = ("causal_mha", "dilated_bidirectional_mqa", "causal_no_global_tokens")  # more of the same


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_banded_matches_reference_values_and_gradients(case):
    causal, window, dilation, heads, kv_heads, with_globals = CASES[case]
    q, k, v, segments, glob = example(len(case), heads, kv_heads)
    segment_mask = masking.SegmentMask(jnp.asarray(segments), jnp.asarray(segments), causal=causal, window=window,
                                       dilation=dilation, global_tokens=jnp.asarray(glob) if with_globals else None,
                                       max_global_tokens=3)
    dense = brute_force_mask(segments, segments, causal=causal, window=window, dilation=dilation,
                             global_tokens=glob if with_globals else None, max_global_tokens=3)
    np.testing.assert_array_equal(np.broadcast_to(segment_mask.dense(LENGTH, LENGTH), dense.shape), dense)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(implementation, mask, q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(out * cotangent), out

    grad = jax.value_and_grad(loss, argnums=(2, 3, 4), has_aux=True)
    both = jax.jit(lambda mask, dense, q, k, v: (grad("banded", mask, q, k, v), grad("reference", dense, q, k, v)))
    ((_, out), grads), ((_, expected), expected_grads) = both(segment_mask, dense, q, k, v)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(out)[segments == 0]), "padding queries attend to nothing"
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_values_and_gradients():
    q, k, v, segments, glob = example(3, 4, 2)
    mask = masking.SegmentMask(jnp.asarray(segments), jnp.asarray(segments), causal=True, window=3, dilation=2,
                               global_tokens=jnp.asarray(glob), max_global_tokens=3)

    def loss(implementation, q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32)), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, expected), expected_grads = grad("reference", q, k, v)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    (_, out), grads = jax.jit(grad, static_argnums=0)("banded", bf16(q), bf16(k), bf16(v))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05)
    for got, want in zip(grads, expected_grads):  # bfloat16 keeps ~3 significant digits
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1)


@pytest.mark.slow
def test_dropout_zeroes_weights_and_keeps_their_expectation():
    """With one-hot values the output is the attention weights (as in test_attention's dropout test)."""
    q, k, _, segments, glob = example(4, 2, 1, head_dim=LENGTH)
    v = np.broadcast_to(np.eye(LENGTH, dtype=np.float32)[None, :, None, :], k.shape)
    mask = masking.SegmentMask(jnp.asarray(segments), jnp.asarray(segments), window=3, dilation=2,
                               global_tokens=jnp.asarray(glob), max_global_tokens=3)
    run = jax.jit(lambda rng: attention.dot_product_attention(q, k, v, mask, implementation="banded",
                                                              dropout_rate=0.5, dropout_rng=rng))
    clean = np.asarray(attention.dot_product_attention(q, k, v, mask, implementation="reference"))
    draws = 200
    dropped = np.asarray(jax.vmap(run)(jax.random.split(jax.random.key(0), draws)))  # [draws, B, T, N, S]
    visible = clean > 1e-6
    assert abs((dropped[:, visible] == 0).mean() - 0.5) < 0.01  # ~70k draws: standard error ~0.002
    survivors = dropped[:, visible] != 0
    np.testing.assert_allclose(dropped[:, visible][survivors],
                               2 * np.broadcast_to(clean[visible], survivors.shape)[survivors], rtol=1e-5)
    assert not np.any(dropped[:, ~visible])
    mean = dropped.mean(0)[visible]
    assert np.all(np.abs(mean - clean[visible]) <= 5 * clean[visible] / np.sqrt(draws))  # each: 5 standard errors
    assert abs(mean.sum() / clean[visible].sum() - 1) < 0.02


def test_refuses_what_it_cannot_do():
    q, k, v, segments, glob = example(5, 2, 2)
    window = masking.SegmentMask(window=3)
    with pytest.raises(ValueError, match="banded.*SegmentMask"):
        attention.dot_product_attention(q, k, v, np.ones((1, 1, LENGTH, LENGTH), bool), implementation="banded")
    with pytest.raises(ValueError, match="banded.*bias"):
        attention.dot_product_attention(q, k, v, window, np.zeros((1, 2, LENGTH, LENGTH)), implementation="banded")
    with pytest.raises(ValueError, match="self-attention"):
        attention.dot_product_attention(q, k[:, :7], v[:, :7], window, implementation="banded")
    with pytest.raises(ValueError, match="max_global_tokens"):
        attention.dot_product_attention(q, k, v, masking.SegmentMask(window=3, global_tokens=jnp.asarray(glob)),
                                        implementation="banded")
    with pytest.raises(ValueError, match="splash.*global tokens"):
        attention.dot_product_attention(q, k, v, masking.SegmentMask(window=3, dilation=2), implementation="splash")


def test_decoding_step_and_window_less_attention_take_the_reference_kernel():
    q, k, v, _, _ = example(6, 2, 2)
    step = masking.SegmentMask(causal=True, window=2, dilation=2, query_index=jnp.asarray([9]),
                               key_index=jnp.arange(LENGTH))
    out = attention.dot_product_attention(q[:, 9:10], k, v, step, implementation="banded")
    expected = attention.dot_product_attention(q[:, 9:10], k, v, step.dense(1, LENGTH), implementation="reference")
    np.testing.assert_allclose(out, expected, atol=1e-6)
    cross = masking.SegmentMask()  # encoder-decoder attention: T != S, no window
    out = attention.dot_product_attention(q[:, :5], k, v, cross, implementation="banded")
    np.testing.assert_allclose(out, attention.dot_product_attention(q[:, :5], k, v), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Cost: O(T * window), never a [T, T] array.


def _largest_intermediate(fn, *args) -> int:
    """The most elements of any value in the jaxpr of fn(*args), sub-jaxprs included."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)
    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_never_hold_a_t_by_t_array(causal):
    length, window = 2048, 64
    q = k = v = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
    glob = np.zeros((1, length), bool)
    glob[0, [0, 700, 2047]] = True
    mask = masking.SegmentMask(causal=causal, window=window, dilation=2, global_tokens=jnp.asarray(glob),
                               max_global_tokens=4)

    def grad(implementation):
        return jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(
            q, k, v, mask, implementation=implementation)), argnums=(0, 1, 2))

    largest = _largest_intermediate(grad("banded"), q, k, v)
    assert largest < 4 * length * window, largest  # [T, 3 windows + global slots] logits, and no more
    assert _largest_intermediate(grad("reference"), q, k, v) >= length * length  # the check can fail


@pytest.mark.slow
def test_compiled_memory_grows_linearly_with_length():
    def temp_bytes(length):
        q = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
        mask = masking.SegmentMask(causal=True, window=256)
        loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, mask, implementation="banded"))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(8192)
    assert 1.6 < large / small < 2.4, (small, large)  # quadratic memory would be ~4x


# ---------------------------------------------------------------------------------------------
# Models: attention="banded" equals the reference kernel with the same parameters.

VOCAB = 40


def tiny(**overrides):
    base = dict(vocab_size=VOCAB, d_model=32, d_ff=64, num_heads=4, num_kv_heads=2, num_encoder_layers=1,
                num_decoder_layers=1, max_len=32, position="rope", sliding_window=3, sliding_window_dilation=2,
                max_global_tokens=2, dropout_rate=0.0)
    return tfm.ModelConfig.preset("tiny", **{**base, **overrides})


def model_inputs():
    tokens = np.random.default_rng(7).integers(1, VOCAB, size=(2, 11)).astype(np.int32)
    tokens[1, 8:] = 0  # padding
    glob = np.zeros((2, 11), bool)
    glob[0, [0, 6]] = True
    glob[1, [0, 3, 9]] = True  # the padding one takes no slot
    return jnp.asarray(tokens), jnp.asarray(glob)


@pytest.mark.parametrize("model_cls", [tfm.EncoderOnly, pytest.param(tfm.EncoderDecoder, marks=pytest.mark.slow),
                                       pytest.param(tfm.DecoderOnly, marks=pytest.mark.slow)])
def test_banded_model_equals_reference_model(model_cls):
    tokens, glob = model_inputs()
    args = (tokens, tokens[:, :7]) if model_cls is tfm.EncoderDecoder else (tokens,)
    banded, reference = model_cls(tiny(attention="banded")), model_cls(tiny(attention="reference"))
    # Random parameters of the right shapes: no init program to compile.
    shapes = jax.eval_shape(reference.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), shapes)
    apply = {model: jax.jit(functools.partial(model.apply, method=None)) for model in (banded, reference)}
    out = apply[banded]({"params": params}, *args, global_mask=glob)
    np.testing.assert_allclose(out, apply[reference]({"params": params}, *args, global_mask=glob), atol=1e-5,
                               rtol=1e-5)
    without = apply[banded]({"params": params}, *args, global_mask=jnp.zeros_like(glob))  # the same compiled program
    assert not np.allclose(out, without, atol=1e-3), "global tokens change the output"


@pytest.mark.slow
def test_banded_decoder_only_cached_decoding_matches_full_forward():
    """Decoding steps take the dense kernel on the same dilated window as the banded full forward."""
    model = tfm.DecoderOnly(tiny(attention="banded"))
    targets, _ = model_inputs()
    params = jax.jit(model.init)(jax.random.key(0), targets)["params"]
    full = jax.jit(model.apply)({"params": params}, targets)
    inputs = tfm.shift_right(targets)
    cache = model.init(jax.random.key(0), inputs, decode=True, method=model.decode)["cache"]
    step = jax.jit(lambda cache, token: model.apply({"params": params, "cache": cache}, token, decode=True,
                                                    method=model.decode, mutable=["cache"]))
    for t in range(inputs.shape[1]):
        logits, mutated = step(cache, inputs[:, t:t + 1])
        cache = mutated["cache"]
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_decoder_only_refuses_global_tokens_when_decoding_and_without_slots():
    tokens, glob = model_inputs()
    model = tfm.DecoderOnly(tiny(attention="banded"))
    with pytest.raises(ValueError, match="decoding step"):
        model.init(jax.random.key(0), tokens, decode=True, global_mask=glob, method=model.decode)
    no_slots = tfm.EncoderOnly(tiny(attention="banded", max_global_tokens=0))
    with pytest.raises(ValueError, match="max_global_tokens > 0"):
        no_slots.init(jax.random.key(0), tokens, global_mask=glob)


def test_model_inputs_forward_the_global_mask():
    batch = dict(inputs=np.ones((2, 5), np.int32), targets=np.ones((2, 4), np.int32),
                 inputs_global_mask=np.eye(2, 5, dtype=bool))
    _, kwargs, _, _ = steps.model_inputs("translation", batch)
    np.testing.assert_array_equal(kwargs["global_mask"], batch["inputs_global_mask"])
    _, kwargs, _, _ = steps.model_inputs("lm", dict(targets=batch["targets"], global_mask=np.eye(2, 4, dtype=bool)))
    np.testing.assert_array_equal(kwargs["global_mask"], np.eye(2, 4, dtype=bool))
    assert "global_mask" not in steps.model_inputs("lm", dict(targets=batch["targets"]))[1]
