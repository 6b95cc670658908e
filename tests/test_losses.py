"""Losses against NumPy and optax references; the MLM corruption's statistics and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer import losses


def random_case(seed=0, batch=3, length=7, vocab=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
    targets = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    targets[0, 5:] = 0  # padding at the end of two rows
    targets[2, 2:] = 0
    return logits, targets


def numpy_smoothed_kl(logits, targets, weights, label_smoothing):
    """sum over tokens of weight * KL(smoothed one-hot || softmax(logits)), in float64."""
    vocab = logits.shape[-1]
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    soft = np.full(logits.shape, label_smoothing / (vocab - 1))
    np.put_along_axis(soft, targets[..., None], 1 - label_smoothing, axis=-1)
    safe_log_soft = np.log(np.where(soft > 0, soft, 1.0))  # 0 log 0 = 0
    kl = (soft * (safe_log_soft - log_p)).sum(-1)
    return (kl * weights).sum(), weights.sum()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_numpy(label_smoothing):
    logits, targets = random_case()
    weights = (targets != 0).astype(np.float32)
    loss_sum, weight_sum = jax.jit(losses.cross_entropy_with_label_smoothing, static_argnums=3)(
        logits, targets, None, label_smoothing)
    want_loss, want_weight = numpy_smoothed_kl(logits, targets, weights, label_smoothing)
    np.testing.assert_allclose(loss_sum, want_loss, rtol=1e-5)
    assert float(weight_sum) == want_weight == 14  # 5 + 7 + 2 real tokens
    chex.assert_type([loss_sum, weight_sum], jnp.float32)


def test_no_smoothing_equals_optax_cross_entropy():
    logits, targets = random_case(seed=1)
    loss_sum, _ = losses.cross_entropy_with_label_smoothing(logits, targets, None, label_smoothing=0.0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss_sum, jnp.sum(per_token * (targets != 0)), rtol=1e-5)


def test_token_statistics_one_pass_matches_the_separate_definitions():
    logits, targets = random_case(seed=2)
    np.put_along_axis(logits[0, :3], targets[0, :3, None], 20.0, axis=-1)  # three sure hits
    weights = (targets != 0).astype(np.float32) * np.linspace(0.5, 1.5, targets.size).reshape(targets.shape)
    stats = jax.jit(losses.token_statistics, static_argnums=3)(logits, targets, weights, 0.1)
    want_loss, want_weight = numpy_smoothed_kl(logits, targets, weights, 0.1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(stats["loss_sum"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(stats["nll_sum"], np.sum(nll * weights), rtol=1e-5)
    np.testing.assert_allclose(stats["correct_sum"], losses.weighted_accuracy(logits, targets, weights)[0], rtol=1e-6)
    np.testing.assert_allclose(stats["weight_sum"], want_weight, rtol=1e-6)
    assert 0 < float(stats["correct_sum"]) < float(stats["weight_sum"])  # some right, some wrong
    # The max is shifted out under a stop_gradient: the gradient is still softmax - smoothed target.
    grad = jax.grad(lambda x: losses.token_statistics(x, targets, None, 0.0)["loss_sum"])(logits)
    want = jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * (targets != 0)))(
        logits)
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_prediction_equal_to_smoothed_target_has_zero_loss():
    vocab, ls = 11, 0.1
    targets = np.array([[3, 5, 0]], np.int32)
    soft = np.full((1, 3, vocab), ls / (vocab - 1))
    np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
    loss_sum, weight_sum = losses.cross_entropy_with_label_smoothing(np.log(soft), targets, None, ls)
    assert abs(float(loss_sum)) < 1e-5 and float(weight_sum) == 2


def test_explicit_weights_are_used():
    logits, targets = random_case(seed=2)
    weights = np.zeros(targets.shape, np.float32)
    weights[1, 3] = 2.0
    loss_sum, weight_sum = losses.cross_entropy_with_label_smoothing(logits, targets, weights, 0.1)
    one_token, _ = losses.cross_entropy_with_label_smoothing(logits[1:2, 3:4], targets[1:2, 3:4], None, 0.1)
    np.testing.assert_allclose(loss_sum, 2 * one_token, rtol=1e-6)
    assert float(weight_sum) == 2.0


def test_padding_contributes_nothing():
    logits, targets = random_case(seed=3)
    changed = logits.copy()
    changed[targets == 0] = np.random.default_rng(9).normal(size=changed[targets == 0].shape) * 100
    before = losses.cross_entropy_with_label_smoothing(logits, targets, None, 0.1)
    after = losses.cross_entropy_with_label_smoothing(changed, targets, None, 0.1)
    assert not np.allclose(logits, changed)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(losses.weighted_accuracy(logits, targets), losses.weighted_accuracy(changed, targets))


def test_bfloat16_logits_computed_in_float32():
    logits, targets = random_case(seed=4, vocab=1000)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss_bf16, _ = losses.cross_entropy_with_label_smoothing(logits_bf16, targets, None, 0.1)
    # The same bfloat16 values, upcast first: identical up to float32 rounding.
    loss_f32, _ = losses.cross_entropy_with_label_smoothing(logits_bf16.astype(jnp.float32), targets, None, 0.1)
    assert loss_bf16.dtype == jnp.float32
    np.testing.assert_allclose(loss_bf16, loss_f32, rtol=1e-6)
    # And close to the float32 logits' loss (bfloat16 rounds logits to ~3 significant digits).
    loss_exact, _ = losses.cross_entropy_with_label_smoothing(logits, targets, None, 0.1)
    np.testing.assert_allclose(loss_bf16, loss_exact, rtol=1e-2)


def test_weighted_accuracy_hand_made():
    logits = np.zeros((2, 3, 4), np.float32)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 1.0  # row 0 predicts 1, 2, 3
    logits[1, 0, 3] = logits[1, 1, 3] = logits[1, 2, 0] = 1.0  # row 1 predicts 3, 3, 0
    targets = np.array([[1, 3, 3], [3, 0, 0]], np.int32)  # correct: yes, no, yes | yes, (pad), (pad)
    correct, total = losses.weighted_accuracy(logits, targets)
    assert (float(correct), float(total)) == (3.0, 4.0)
    correct, total = losses.weighted_accuracy(logits, targets, np.full((2, 3), 0.5, np.float32))
    assert (float(correct), float(total)) == (2.0, 3.0)  # pad positions count when weighted explicitly


VOCAB, MASK_ID, SPECIAL = 1000, 999, (0, 1, 2)


def mlm_tokens(seed=0, batch=256, length=512):
    """[B, T] = [256, 512] (one shape, so one trace), about 114k tokens that are not pad or special."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MASK_ID, size=(batch, length)).astype(np.int32)  # includes the special ids 1, 2
    lengths = rng.integers(3 * length // 4, length + 1, size=batch)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # padding
    return tokens


@chex.assert_max_traces(n=1)
def mask_fn(rng, tokens):
    return losses.mask_tokens_for_mlm(rng, tokens, vocab_size=VOCAB, mask_id=MASK_ID, special_ids=SPECIAL)


mask_jit = jax.jit(mask_fn)


def test_mlm_statistics():
    tokens = mlm_tokens()
    inputs, targets, weights = map(np.asarray, mask_jit(jax.random.key(0), tokens))
    eligible = ~np.isin(tokens, SPECIAL)
    assert eligible.sum() > 100_000
    selected = weights == 1.0
    assert 0.14 < selected.sum() / eligible.sum() < 0.16
    n = selected.sum()
    masked = (inputs == MASK_ID) & selected
    unchanged = (inputs == tokens) & selected
    randomised = selected & ~masked & ~unchanged
    assert 0.78 < masked.sum() / n < 0.82
    assert 0.085 < unchanged.sum() / n < 0.115  # 10%, plus random draws equal to the original (~0.01%)
    assert 0.085 < randomised.sum() / n < 0.115
    np.testing.assert_array_equal(targets, tokens)
    assert set(np.unique(weights)) == {0.0, 1.0}


def test_mlm_invariants():
    tokens = mlm_tokens(seed=1)
    inputs, targets, weights = map(np.asarray, mask_jit(jax.random.key(1), tokens))
    special = np.isin(tokens, SPECIAL)
    assert special.sum() > 1000 and weights[special].sum() == 0  # pad / special never selected
    np.testing.assert_array_equal(inputs[weights == 0], tokens[weights == 0])  # unselected untouched
    changed = inputs != tokens
    assert not np.isin(inputs[changed], SPECIAL).any()  # random replacements are never special ids
    assert inputs.dtype == tokens.dtype and weights.dtype == np.float32


def test_mlm_is_deterministic_in_rng():
    tokens = mlm_tokens(seed=2)
    first = mask_jit(jax.random.key(3), tokens)
    again = mask_jit(jax.random.key(3), tokens)
    other = mask_jit(jax.random.key(4), tokens)
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("platform", ["cpu", "tpu"])  # the target's logit gathered on CPU, a masked sum elsewhere
@pytest.mark.parametrize("chunk_tokens", [1, 6, 7, 1000])  # one position per block, uneven, whole
def test_projected_statistics_equal_those_of_the_full_logits(chunk_tokens, platform, monkeypatch):
    monkeypatch.setattr(losses.runtime, "trace_platform", lambda: platform)
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3, 7, 5)).astype(np.float32)
    projection = rng.normal(size=(11, 5)).astype(np.float32)
    _, targets = random_case(seed=3)
    weights = (targets != 0).astype(np.float32)

    def full(f, p):
        return losses.token_statistics(jnp.einsum("BTD,VD->BTV", f, p), targets, weights, 0.1)

    def fused(f, p):
        return losses.projected_token_statistics(f, p, targets, weights, 0.1, chunk_tokens=chunk_tokens)

    got, want = jax.jit(fused)(features, projection), full(features, projection)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    grads = jax.grad(lambda f, p: fused(f, p)["loss_sum"] * 0.5, argnums=(0, 1))(features, projection)
    want_grads = jax.grad(lambda f, p: full(f, p)["loss_sum"] * 0.5, argnums=(0, 1))(features, projection)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_projected_statistics_in_bfloat16_are_close_to_float32():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(3, 7, 16)).astype(np.float32)
    projection = rng.normal(size=(11, 16)).astype(np.float32) * 0.3
    _, targets = random_case(seed=4)

    def loss(f, p, dtype):
        return losses.projected_token_statistics(f, p, targets, None, 0.1, dtype=dtype, chunk_tokens=6)["loss_sum"]

    np.testing.assert_allclose(loss(features, projection, jnp.bfloat16), loss(features, projection, jnp.float32),
                               rtol=2e-2)
    g16 = jax.grad(loss, argnums=1)(features, projection, jnp.bfloat16)
    g32 = jax.grad(loss, argnums=1)(features, projection, jnp.float32)
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, atol=3e-2 * float(jnp.max(jnp.abs(g32))))
