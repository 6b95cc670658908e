"""Losses and the masked-language-model corruption: pure, jit-able functions of arrays.

Losses return *sums* over real tokens together with the summed weight, so that sums from
micro-batches, devices and hosts add up, and the caller normalises once: `loss_sum / weight_sum`.

Legend: B batch, T length, V vocab. Token id 0 is padding.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transformer import precision, runtime


def default_weights(targets, weights=None):
    """`weights` as float32, or 1.0 at real tokens (targets != 0) and 0.0 at padding. [B, T]."""
    if weights is None:
        return (targets != 0).astype(jnp.float32)
    return jnp.asarray(weights, jnp.float32)


def cross_entropy_with_label_smoothing(logits, targets, weights=None, label_smoothing: float = 0.1):
    """Label-smoothed cross entropy (paper, Sec. 5.4), summed over weighted tokens.

    The T2T / Flax-WMT convention: the smoothed target puts `confidence = 1 - label_smoothing` on the
    true class and `low = label_smoothing / (V - 1)` on each of the V - 1 others, and the entropy of
    that target is subtracted, so the loss is KL(smoothed target || softmax(logits)): 0 for a
    prediction equal to the smoothed target, and the plain cross entropy when label_smoothing = 0.

    Computed in float32 whatever the dtype of `logits`.

    Args:
      logits: [B, T, V] float.
      targets: [B, T] int, the true token ids.
      weights: [B, T] float, or None for `targets != 0` (padding weighs 0).
      label_smoothing: the smoothing mass, a Python float in [0, 1) (static under jit).
    Returns:
      (loss_sum, weight_sum): float32 scalars; the mean loss per real token is their ratio.
    """
    stats = token_statistics(logits, targets, weights, label_smoothing)
    return stats["loss_sum"], stats["weight_sum"]


def token_statistics(logits, targets, weights=None, label_smoothing: float = 0.1) -> dict:
    """The training loss and its metrics in one pass over the [B, T, V] logits.

    Returns float32 sums over weighted tokens: `loss_sum` (label-smoothed cross entropy, as
    `cross_entropy_with_label_smoothing`), `nll_sum` (plain cross entropy), `correct_sum` (tokens
    whose target has the largest logit) and `weight_sum`. The logits are the largest array of a
    step (4096 x 32k floats for a base-size batch), so the three share one log-softmax and the
    accuracy reuses its max instead of an argmax: reading them once more per metric cost more than
    the feed-forward layers at the Multi30k shape.
    """
    vocab_size = logits.shape[-1]
    weights = default_weights(targets, weights)
    confidence, low, normalizing_constant = _smoothed_target(label_smoothing, vocab_size)
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
    nll = -target_log_prob
    # NOTE: -sum_v soft_v log p_v with soft = low + (confidence - low) * one_hot, written without
    # materialising a [B, T, V] one-hot.
    cross_entropy = (confidence - low) * nll - low * jnp.sum(log_probs, axis=-1)  # [B, T]
    # Correct where the target's logit is the largest: the max log_softmax takes anyway, no argmax.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return dict(loss_sum=jnp.sum((cross_entropy - normalizing_constant) * weights),
                nll_sum=jnp.sum(nll * weights), correct_sum=jnp.sum(correct * weights), weight_sum=jnp.sum(weights))


def projected_token_statistics(features, projection, targets, weights=None, label_smoothing: float = 0.1, *,
                               dtype=jnp.float32, chunk_tokens: int = 512) -> dict:
    """`token_statistics` of the logits `features @ projection^T`, never holding all of them.

    The output projection and the loss fused (as in Liger-Kernel's fused linear cross entropy):
    the [B, T, V] logits are made `chunk_tokens` at a time (a block of positions for every row),
    and each block's loss, metrics and gradients with respect to `features` and `projection` are
    computed while the block is still in cache. The backward pass then only scales the stored
    gradients. Products run in `dtype` with float32 accumulation (`precision.einsum`); softmax
    and sums in float32.

    Gradients flow through `loss_sum` only: the other entries are metrics.

    Args:
      features: [B, T, D], the decoder's last hidden states.
      projection: [V, D], the pre-softmax weights (the tied embedding; an untied [D, V] kernel's
        transpose).
      targets, weights, label_smoothing: as in `token_statistics`.
      dtype: the compute dtype of the two products.
      chunk_tokens: about how many positions (rows x columns) a block holds.
    Returns:
      the dict of `token_statistics`.
    """
    weights = default_weights(targets, weights)
    batch, length = targets.shape
    block = max(1, min(length, chunk_tokens // max(batch, 1)))
    while length % block:
        block -= 1
    return _fused_statistics(features, projection, targets, weights, float(label_smoothing), jnp.dtype(dtype), block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_statistics(features, projection, targets, weights, label_smoothing, dtype, block):
    return _fused_forward(features, projection, targets, weights, label_smoothing, dtype, block)[0]


def _fused_forward(features, projection, targets, weights, label_smoothing, dtype, block):
    batch, length, d_model = features.shape
    vocab_size = projection.shape[0]
    confidence, low, normalizing_constant = _smoothed_target(label_smoothing, vocab_size)
    w16 = projection.astype(dtype)
    # sum_V logits = y . sum_V W: the label-smoothing term's sum over the vocabulary without a pass
    # over each block's logits.
    w_sum = jnp.sum(w16.astype(jnp.float32), axis=0)  # [D]
    on_cpu = runtime.trace_platform() == "cpu"
    num_blocks = length // block

    def blocks(x):  # [B, T, ...] -> [T / block, B, block, ...]
        return jnp.moveaxis(x.reshape(batch, num_blocks, block, *x.shape[2:]), 1, 0)

    def step(grad_projection_t, xs):
        y, t, w = xs  # [B, c, D], [B, c], [B, c]
        y16 = y.astype(dtype)
        logits = jnp.einsum("BcD,VD->BcV", y16, w16, preferred_element_type=jnp.float32)  # [B, c, V]
        max_logit = jnp.max(logits, axis=-1)  # [B, c]
        shifted = logits - max_logit[..., None]
        exp = jnp.exp(shifted)
        sum_exp = jnp.sum(exp, axis=-1)  # [B, c]
        log_normalizer = jnp.log(sum_exp)
        is_target = jnp.arange(vocab_size) == t[..., None]  # [B, c, V], fused, never stored
        if on_cpu:  # the target's logit read from the block (B x c elements): one pass over it fewer
            target_shifted = jnp.take_along_axis(shifted, t[..., None], axis=-1)[..., 0]
        else:  # a masked sum, which fuses with the other passes and suits a vocabulary sharded over devices
            target_shifted = jnp.sum(jnp.where(is_target, shifted, 0.0), axis=-1)
        nll = log_normalizer - target_shifted
        sum_logits = jnp.einsum("BcD,D->Bc", y16.astype(jnp.float32), w_sum, precision=jax.lax.Precision.HIGHEST)
        sum_log_probs = sum_logits - vocab_size * (max_logit + log_normalizer)
        cross_entropy = (confidence - low) * nll - low * sum_log_probs
        sums = jnp.stack([jnp.sum((cross_entropy - normalizing_constant) * w), jnp.sum(nll * w),
                          jnp.sum((target_shifted >= 0.0) * w)])
        # d loss / d logits = (softmax - smoothed one-hot) * weight.
        probs = exp / sum_exp[..., None]
        grad_logits = ((probs - low - (confidence - low) * is_target) * w[..., None]).astype(dtype)
        grad_y = jnp.einsum("BcV,VD->BcD", grad_logits, w16, preferred_element_type=jnp.float32)
        grad_projection_t = grad_projection_t + precision.leading_contraction(  # [D, V]
            y16.reshape(-1, d_model), grad_logits.reshape(-1, vocab_size))
        return grad_projection_t, (sums, grad_y.astype(features.dtype))

    grad_projection_t, (sums, grad_y) = jax.lax.scan(
        step, jnp.zeros((d_model, vocab_size), jnp.float32), (blocks(features), blocks(targets), blocks(weights)))
    grad_projection = precision.copying_transpose(grad_projection_t, (1, 0))
    sums = jnp.sum(sums, axis=0)
    stats = dict(loss_sum=sums[0], nll_sum=sums[1], correct_sum=sums[2], weight_sum=jnp.sum(weights))
    grad_features = jnp.moveaxis(grad_y, 0, 1).reshape(features.shape)
    return stats, (grad_features, grad_projection.astype(projection.dtype), targets, weights)


def _fused_backward(label_smoothing, dtype, block, residuals, grads):
    grad_features, grad_projection, targets, weights = residuals
    scale = grads["loss_sum"]
    return ((scale * grad_features).astype(grad_features.dtype), scale * grad_projection,
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights))


_fused_statistics.defvjp(_fused_forward, _fused_backward)


def _smoothed_target(label_smoothing: float, vocab_size: int) -> tuple[float, float, float]:
    """(confidence on the true class, `low` on each other class, the smoothed target's entropy)."""
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)
    return confidence, low, -(_xlogx(confidence) + (vocab_size - 1) * _xlogx(low))


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0  # 0 log 0 = 0: no smoothing, entropy 0


def weighted_accuracy(logits, targets, weights=None):
    """(correct_sum, weight_sum): weighted count of tokens whose argmax is the target.

    Args:
      logits: [B, T, V]. targets: [B, T] int. weights: [B, T] float, or None for `targets != 0`.
    """
    weights = default_weights(targets, weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    return jnp.sum(correct * weights), jnp.sum(weights)


def mask_tokens_for_mlm(rng, tokens, *, vocab_size: int, mask_id: int, mask_prob: float = 0.15,
                        mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                        special_ids: Sequence[int] = (0,)):
    """BERT's masked-LM corruption (Devlin et al. 2019, Sec. 3.1).

    Each token whose id is not in `special_ids` (padding included) is selected independently with
    probability `mask_prob`. A selected token becomes `mask_id` with probability `mask_token_prob`,
    a random token with probability `random_token_prob`, and stays unchanged otherwise (80/10/10).
    Random tokens are drawn uniformly from the ids in [0, vocab_size) that are neither special nor
    `mask_id` (so they may equal the original token, as in BERT).

    Args:
      rng: a jax.random key.
      tokens: [B, T] int, the uncorrupted tokens.
      vocab_size, mask_id, special_ids: Python ints (static under jit).
    Returns:
      inputs: [B, T] int, the corrupted tokens the model sees;
      targets: [B, T] int, the original tokens;
      weights: [B, T] float32, 1.0 at selected positions, else 0.0 (the loss is over those only).
    """
    special = np.asarray(sorted(set(special_ids)), np.int32)
    # Ids a random replacement may take: everything but the special ids and [MASK].
    replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), np.append(special, mask_id))
    select_rng, action_rng, random_rng = jax.random.split(rng, 3)

    eligible = ~jnp.isin(tokens, jnp.asarray(special))  # [B, T]
    selected = eligible & jax.random.bernoulli(select_rng, mask_prob, tokens.shape)
    action = jax.random.uniform(action_rng, tokens.shape)  # one draw splits the selected 80/10/10
    to_mask = selected & (action < mask_token_prob)
    to_random = selected & (action >= mask_token_prob) & (action < mask_token_prob + random_token_prob)
    random_tokens = jnp.asarray(replacements)[jax.random.randint(random_rng, tokens.shape, 0, len(replacements))]

    inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype), tokens)
    inputs = jnp.where(to_random, random_tokens.astype(tokens.dtype), inputs)
    return inputs, tokens, selected.astype(jnp.float32)

