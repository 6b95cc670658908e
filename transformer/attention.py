"""Scaled dot-product attention (paper, Sec. 3.2) and the multi-head attention module.

Axis legend, used in every shape and einsum string of this package:
  B batch, T query length, S key length, D model dim, N query heads, K key/value heads,
  G query heads per key/value head (N = K * G), H head dim, F feed-forward dim, V vocab,
  W beam width (beam search).

`dot_product_attention` is a pure function with four interchangeable kernels:
  * "reference": plain einsums, softmax in float32. The readable definition.
  * "fused": `jax.nn.dot_product_attention` (XLA; cuDNN flash attention on GPU in 16-bit dtypes);
    on TPU, splash attention wherever splash applies (below, and T, S >= 128); on CPU without a
    bias, `_softmax_attention` (the reference's result with a written-out gradient, fewer passes
    over the [T, S] weights).
  * "chunked": online softmax over key blocks (Rabe & Staats 2021; Dao et al. 2022), memory
    O(T * block) instead of O(T * S), for long sequences.
  * "splash": the Pallas TPU splash attention kernel (jax.experimental.pallas.ops.tpu), a blocked
    flash attention that reads the mask's structure (`masking.SegmentMask`: segment ids for padding
    and packing, causal, window) and skips fully masked blocks. Compiled with Mosaic on TPU, run in
    Pallas interpret mode elsewhere (slow; for tests). No bias, no attention dropout; decoding steps
    with a cache take the reference kernel.
  * "banded": Longformer's sliding window (transformer.longformer), computed band by band in
    O(T * window) for self-attention with a windowed `masking.SegmentMask` (dilation and global
    tokens included). No bias; decoding steps and window-less (cross) attention take the reference kernel.
All agree on masked inputs, and all return zeros for a query whose keys are all masked (a padding
query), rather than an average of values. `attention_weights` returns the weights themselves, for
attention maps (`MultiHeadAttention` sows them when asked: `transformer.attention_maps`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import dropout, longformer, masking, positional, precision, reformer, runtime
from transformer.config import ATTENTION_KINDS

IMPLEMENTATIONS = ATTENTION_KINDS  # the kernels of dot_product_attention, one per ModelConfig.attention
# A large finite negative rather than -inf, so fully masked rows stay NaN-free.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
SPLASH_BLOCK = 128  # splash attention's query and key block; lengths are padded to a multiple


def dot_product_attention(
    query,
    key,
    value,
    mask=None,
    bias=None,
    *,
    implementation: str = "reference",
    dropout_rate: float = 0.0,
    dropout_rng=None,
    chunk_size: int = 128,
    kv_length=None,
    kv_rows=None,
):
    """softmax(Q K^T / sqrt(d_k) + bias) V over the unmasked keys (paper, eq. 1).

    Args:
      query: [B, T, N, H].
      key, value: [B, S, K, H], with N a multiple of K (grouped-query attention when K < N).
      mask: bool, broadcastable to [B, N, T, S]; True = attend. Or a `masking.SegmentMask`, which
        "splash" needs and the dense kernels expand. None = attend everywhere.
      bias: float, broadcastable to [B, N, T, S]; added to the logits (relative positions, ALiBi).
      implementation: "reference", "fused", "chunked", "splash" or "banded" (see above).
      dropout_rate: dropout on the attention weights, applied when `dropout_rng` is given.
      chunk_size: key block length of the "chunked" kernel.
      kv_length: a traced count: only keys [0, kv_length) exist yet (a decoding step's cache),
        and only the blocks of PREFIX_BLOCK keys that hold them are read (online softmax, as
        "chunked"), whatever the implementation. None = all S keys.
      kv_rows: beam search's map of a cache that is never reordered, int [B', W, S] with B = B' * W
        (`beam_rows`): key/value row w of each group of W reads position s from row
        kv_rows[., w, s] of its group. The prefix kernel reads through it block by block; every
        other path gathers the keys and values first. None = row b holds row b's keys.
    Returns:
      [B, T, N, H] in the query's dtype.
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"key {key.shape} and value {value.shape} must be [B, S, K, H] matching query {query.shape}.")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}).")
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    splash_first = implementation == "splash" or (
        implementation == "fused" and _on_tpu() and min(q_len, kv_len) >= SPLASH_BLOCK)
    if kv_rows is not None and (kv_length is None or use_dropout or splash_first):
        key, value = beam_rows(key, kv_rows), beam_rows(value, kv_rows)  # only the prefix kernel reads through it
        kv_rows = None
    if splash_first:
        segments = mask if isinstance(mask, masking.SegmentMask) else masking.SegmentMask() if mask is None else None
        reason = _splash_unsupported(segments, bias, use_dropout)
        if reason is None:
            return _splash_attention(query, key, value, segments, interpret=not _on_tpu())
        if implementation == "splash" and (segments is None or segments.default_indices):
            raise ValueError(f"attention 'splash' {reason}: use 'fused', 'reference' or 'chunked'.")
        # A decoding step with a cache (or "fused" outside splash's reach): a dense kernel.
        implementation = "reference" if implementation == "splash" else implementation
    if implementation == "banded":
        if not isinstance(mask, masking.SegmentMask):
            raise ValueError("attention 'banded' needs a masking.SegmentMask with a window, not a dense mask array "
                             "or None: use 'fused', 'reference' or 'chunked'.")
        if mask.default_indices and kv_length is None and mask.window is not None:
            if bias is not None:
                raise ValueError("attention 'banded' takes no attention bias (relative or ALiBi positions): "
                                 "use 'chunked' with a window, or rope/sinusoidal/learned positions.")
            return longformer.banded_attention(query, key, value, mask, dropout_rate=dropout_rate,
                                               dropout_rng=dropout_rng if use_dropout else None)
        # NOTE: a decoding step with a cache, or attention without a window (encoder-decoder attention
        # in a banded model), has no band to exploit: the reference kernel, as splash does.
        implementation = "reference"
    if isinstance(mask, masking.SegmentMask):
        mask = mask.dense(q_len, kv_len)
    full = (batch, num_heads, q_len, kv_len)
    for name, x in (("mask", mask), ("bias", bias)):
        if x is not None and (x.ndim != 4 or any(d not in (1, f) for d, f in zip(x.shape, full))):
            raise ValueError(f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S] = {list(full)}.")
    if kv_length is not None and not use_dropout:
        return _prefix_attention(query, key, value, mask, bias, kv_length, kv_rows)
    if implementation == "reference" or (implementation == "fused" and use_dropout):
        # NOTE: jax.nn.dot_product_attention has no dropout, so training with attention dropout
        # takes the reference path.
        return _reference_attention(query, key, value, mask, bias, dropout_rate if use_dropout else 0.0, dropout_rng)
    if implementation == "fused":
        return _fused_attention(query, key, value, mask, bias)
    if implementation == "chunked":
        return _chunked_attention(
            query, key, value, mask, bias, dropout_rate if use_dropout else 0.0, dropout_rng, chunk_size)
    if implementation == "lsh":
        raise ValueError("attention 'lsh' shares queries and keys, so it is MultiHeadAttention's kernel "
                         "(transformer.reformer.lsh_attention), not dot_product_attention's.")
    raise ValueError(f"Unknown attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}.")


def attention_weights(query, key, mask=None, bias=None, *, kv_length=None):
    """The weights softmax(Q K^T / sqrt(d_k) + bias) of `dot_product_attention`, for attention maps.

    Computed as the "reference" kernel computes them (the other kernels agree with it), with the
    same arguments: query [B, T, N, H]; key [B, S, K, H]; mask, bias broadcastable to [B, N, T, S]
    (mask may be a `masking.SegmentMask`); kv_length as there. Before attention dropout.
    Returns:
      [B, N, T, S] float32, key/value heads repeated over their G query heads; 0 on masked keys,
      so each row sums to 1 over its unmasked keys, and a row with no unmasked key is all 0.
    """
    batch, q_len, num_heads, _ = query.shape
    kv_len = key.shape[1]
    if isinstance(mask, masking.SegmentMask):
        mask = mask.dense(q_len, kv_len)
    if kv_length is not None:
        live = (jnp.arange(kv_len) < kv_length)[None, None, None, :]  # cache positions written so far
        mask = live if mask is None else mask & live
    weights = _reference_weights(query, key, mask, bias)  # [B, K, G, T, S]
    return weights.reshape(batch, num_heads, q_len, kv_len)


def _group_heads(x, num_kv_heads):
    """[B, N or 1, T, S] -> [B, K or 1, G or 1, T, S], splitting query heads into kv groups."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, -1, *x.shape[2:])


def _reference_weights(query, key, mask, bias):
    """The reference kernel's softmax weights [B, K, G, T, S] float32: 0 on masked keys."""
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    query = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, K, G, H]
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    # attn_logits: [B, K, G, T, S], accumulated and normalised in float32.
    logits = precision.einsum("BTKGH,BSKH->BKGTS", query, key, query.dtype, out_dtype=jnp.float32)
    if bias is not None:
        logits = logits + _group_heads(bias, num_kv_heads).astype(jnp.float32)
    if mask is not None:
        mask = _group_heads(mask, num_kv_heads)
        logits = jnp.where(mask, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # a fully masked row attends to nothing
    return weights


def _reference_attention(query, key, value, mask, bias, dropout_rate, dropout_rng):
    batch, q_len, num_heads, head_dim = query.shape
    weights = _reference_weights(query, key, mask, bias)  # [B, K, G, T, S]
    if dropout_rate > 0.0:
        weights = dropout.apply(dropout_rng, weights, dropout_rate)
    out = precision.einsum("BKGTS,BSKH->BTKGH", weights, value, value.dtype)
    return out.reshape(batch, q_len, num_heads, head_dim)


def _softmax_attention(query, key, value, mask):
    """The reference kernel's result (no bias, no dropout) with a hand-written gradient, for CPU.

    XLA's gradient of the reference reads and writes the [B, K, G, T, S] weights in float32 some
    ten times (the softmax's output kept for its gradient, the mask applied again, casts). Here the
    forward keeps the weights once, in the compute dtype, and the backward computes the softmax's
    gradient w * (dw - sum_s w dw) in one pass over the [T, S] arrays. Masked weights are 0, so
    their gradients are too. (FlashAttention's identity sum_s w_s dw_s = sum_h dout_h out_h, Dao et
    al. 2022, reads fewer bytes, but XLA:CPU puts that [T, H] reduction, broadcast over S, into a
    YNNPACK fusion 5x slower than this one: without it the bfloat16 Multi30k step ran 1.05-1.06x
    faster, and this whole call in bfloat16 1.33x at [64, 64, 4, 32] and 1.51x at [32, 64, 8, 64],
    2026-12-07.)

    The products run head-major: queries, keys and values are copied to [B, K, (G,) T, H] first,
    and the key and value gradients read transposed copies of the [T, S] arrays, so that every
    product is a plain batched [M, K] @ [K, N] or [M, K] @ [N, K]^T, the forms XLA's CPU kernels
    run fast (1.39x the whole call at [64, 64, 4, 32] in bfloat16, 2026-11-30, against the same
    products on [B, T, K, H] operands, which XLA lays out itself). The copies are
    `precision.copying_transpose`: XLA would fold a plain transpose back into the product.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    query = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, K, G, H]
    mask = None if mask is None else _group_heads(mask, num_kv_heads)  # [B, K or 1, G or 1, T, S]
    out = _softmax_attention_vjp(head_dim**-0.5, query, key, value, mask)
    return out.reshape(batch, q_len, num_heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_attention_vjp(scale, query, key, value, mask):
    return _softmax_attention_forward(scale, query, key, value, mask)[0]


def _softmax_attention_forward(scale, query, key, value, mask):
    dtype = query.dtype
    query = precision.copying_transpose(query, (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    key = precision.copying_transpose(key, (0, 2, 1, 3))  # [B, K, S, H]
    value = precision.copying_transpose(value, (0, 2, 1, 3))
    # logits, weights: [B, K, G, T, S]; the softmax in float32, the weights kept in `dtype`.
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", query, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    if mask is not None:
        exp = jnp.where(mask, exp, 0.0)  # a fully masked row attends to nothing
    total = jnp.sum(exp, axis=-1, keepdims=True)
    weights = (exp / jnp.where(total > 0.0, total, 1.0)).astype(dtype)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", weights, value, preferred_element_type=jnp.float32).astype(dtype)
    return precision.copying_transpose(out, (0, 3, 1, 2, 4)), (query, key, value, weights)  # [B, T, K, G, H]


def _softmax_attention_backward(scale, residuals, grad):
    query, key, value, weights = residuals  # head-major: [B, K, G, T, H], [B, K, S, H] x 2, [B, K, G, T, S]
    dtype = query.dtype
    grad = precision.copying_transpose(grad.astype(dtype), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    d_weights = jnp.einsum("BKGTH,BKSH->BKGTS", grad, value, preferred_element_type=jnp.float32)
    # d logits = w * (dw - sum_s w dw), in one pass over the [T, S] arrays (the row sums [B, K, G, T, 1] inside).
    weights_f32 = weights.astype(jnp.float32)
    row = jnp.sum(weights_f32 * d_weights, axis=-1, keepdims=True)
    d_logits = (weights_f32 * (d_weights - row)).astype(dtype)
    d_query = jnp.einsum("BKGTS,BKSH->BKGTH", d_logits, key, preferred_element_type=jnp.float32) * scale
    # The key and value gradients sum over (G, T): from [B, K, S, G, T] copies, plain products.
    d_logits_t = precision.copying_transpose(d_logits, (0, 1, 4, 2, 3))
    weights_t = precision.copying_transpose(weights, (0, 1, 4, 2, 3))
    d_key = jnp.einsum("BKSGT,BKGTH->BKSH", d_logits_t, query, preferred_element_type=jnp.float32) * scale
    d_value = jnp.einsum("BKSGT,BKGTH->BKSH", weights_t, grad, preferred_element_type=jnp.float32)
    d_query = precision.copying_transpose(d_query.astype(dtype), (0, 3, 1, 2, 4))  # back to [B, T, K, G, H]
    d_key = precision.copying_transpose(d_key.astype(key.dtype), (0, 2, 1, 3))  # [B, S, K, H]
    d_value = precision.copying_transpose(d_value.astype(value.dtype), (0, 2, 1, 3))
    return d_query, d_key, d_value, None


_softmax_attention_vjp.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def _fused_attention(query, key, value, mask, bias):
    if bias is None and _platform() == "cpu":
        return _softmax_attention(query, key, value, mask)
    on_gpu = jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(
        query, key, value, bias=None if bias is None else bias.astype(query.dtype), mask=mask,
        implementation="cudnn" if on_gpu else "xla")
    if mask is not None:
        # The fused kernels average all values for a fully masked row; zero it like the reference.
        any_key = jnp.any(mask, axis=-1)  # [B, N or 1, T]
        out = out * jnp.transpose(any_key, (0, 2, 1))[..., None].astype(out.dtype)  # [B, T, N or 1, 1]
    return out


def _chunked_attention(query, key, value, mask, bias, dropout_rate, dropout_rng, chunk_size):
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    chunk = min(chunk_size, kv_len)
    num_chunks = -(-kv_len // chunk)
    pad = num_chunks * chunk - kv_len

    # Pad keys to whole blocks; padded keys are masked out.
    valid = jnp.arange(num_chunks * chunk) < kv_len
    if mask is None:
        mask = valid[None, None, None, :]
    else:
        mask = jnp.broadcast_to(mask, mask.shape[:3] + (kv_len,))
        mask = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad),)) & valid
    key = jnp.pad(key, ((0, 0), (0, pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, pad), (0, 0), (0, 0)))
    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(jnp.float32), bias.shape[:3] + (kv_len,))
        bias = jnp.pad(bias, ((0, 0),) * 3 + ((0, pad),))

    def blocks(x, axis):  # split the key axis into [num_chunks, ..., chunk, ...], blocks leading
        x = x.reshape(*x.shape[:axis], num_chunks, chunk, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    xs = dict(key=blocks(key, 1), value=blocks(value, 1), mask=blocks(_group_heads(mask, num_kv_heads), 4),
              index=jnp.arange(num_chunks))
    if bias is not None:
        xs["bias"] = blocks(_group_heads(bias, num_kv_heads), 4)
    query = query.reshape(batch, q_len, num_kv_heads, groups, head_dim) * jnp.asarray(head_dim**-0.5, query.dtype)

    @jax.checkpoint  # recompute each block's probabilities in the backward pass instead of storing them
    def step(carry, block):
        logits = precision.einsum("BTKGH,BSKH->BKGTS", query, block["key"], query.dtype, out_dtype=jnp.float32)
        if "bias" in block:
            logits = logits + block["bias"]
        drop = None
        if dropout_rate > 0.0:
            # Dropping unnormalised weights equals dropping normalised ones: the row scale is shared.
            drop = functools.partial(dropout.apply, jax.random.fold_in(dropout_rng, block["index"]), rate=dropout_rate)
        return _online_softmax_block(carry, logits, block["mask"], block["value"], drop), None

    (_, denominator, acc), _ = jax.lax.scan(step, _online_softmax_init(batch, num_kv_heads, groups, q_len, head_dim),
                                            xs)
    return _online_softmax_output(denominator, acc, query.dtype)


def _online_softmax_init(batch, num_kv_heads, groups, q_len, head_dim):
    """(running max, denominator, accumulator) before the first key block: [B, K, G, T] x 2, [B, K, G, T, H]."""
    stats_shape = (batch, num_kv_heads, groups, q_len)
    return (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (head_dim,), jnp.float32))


def _online_softmax_block(carry, logits, keep, value, dropout=None):
    """The online softmax's update for one key block: logits [B, K, G, T, C] float32, keep
    broadcastable to them (False = the key takes no weight), value [B, C, K, H]."""
    running_max, denominator, acc = carry
    logits = jnp.where(keep, logits, _MASKED)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    probs = jnp.exp(logits - new_max[..., None]) * keep  # masked keys contribute exactly 0
    correction = jnp.exp(running_max - new_max)
    denominator = denominator * correction + probs.sum(axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    acc = acc * correction[..., None] + precision.einsum(
        "BKGTS,BSKH->BKGTH", probs, value, value.dtype, out_dtype=jnp.float32)
    return new_max, denominator, acc


def _online_softmax_output(denominator, acc, dtype):
    """[B, K, G, T], [B, K, G, T, H] -> attention output [B, T, N, H]; rows with no key stay 0."""
    out = acc / jnp.where(denominator > 0, denominator, 1.0)[..., None]
    batch, num_kv_heads, groups, q_len, head_dim = out.shape
    out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
    return out.reshape(batch, q_len, num_kv_heads * groups, head_dim).astype(dtype)


PREFIX_BLOCK = 16  # keys per block of `_prefix_attention`


def beam_rows(x, rows):
    """x [B' * W, S, ...] read through beam search's row map rows [B', W, S] -> [B' * W, S, ...]:
    row w of each group of W takes position s from row rows[., w, s] of the same group (never from
    another group, so with the batch split over devices nothing moves between them). None = x."""
    if rows is None:
        return x
    groups, beams, length = rows.shape
    if x.shape[:2] != (groups * beams, length):
        raise ValueError(f"beam rows {rows.shape} do not map a cache of shape {x.shape}: [B' * W, S, ...] expected.")
    grouped = x.reshape(groups, beams, *x.shape[1:])
    index = rows.reshape(groups, beams, length, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(grouped, index, axis=1, mode="clip").reshape(x.shape)


def _prefix_attention(query, key, value, mask, bias, kv_length, kv_rows=None, block: int = PREFIX_BLOCK):
    """Attention over keys [0, kv_length) only, a block of keys at a time (online softmax).

    A decoding step then reads the keys and values written so far rather than the whole cache.
    Blocks start at multiples of `block`; the last one is moved back to end at S (its keys already
    seen are masked out), so S need not be a multiple of `block`. With `kv_rows` [B', W, S] each
    block is gathered through beam search's row map (`beam_rows`) as it is read.
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    block = min(block, kv_len)
    query = query.reshape(batch, q_len, num_kv_heads, groups, head_dim) * jnp.asarray(head_dim**-0.5, query.dtype)
    mask = None if mask is None else _group_heads(mask, num_kv_heads)  # [B|1, K|1, G|1, T, S]
    bias = None if bias is None else _group_heads(bias, num_kv_heads).astype(jnp.float32)

    def keys(x, start):  # the block's slice of the last (key) axis, if x has one
        return x if x.shape[-1] == 1 else jax.lax.dynamic_slice_in_dim(x, start, block, axis=x.ndim - 1)

    def step(i, carry):
        first = i * block
        start = jnp.minimum(first, kv_len - block)
        positions = start + jnp.arange(block)
        live = (positions >= first) & (positions < kv_length)  # [block]
        if mask is not None:
            live = live & keys(mask, start)
        rows = None if kv_rows is None else jax.lax.dynamic_slice_in_dim(kv_rows, start, block, axis=2)
        k, v = (precision.from_bits(beam_rows(jax.lax.dynamic_slice_in_dim(precision.as_bits(x), start, block, axis=1),
                                              rows), x.dtype)
                for x in (key, value))  # sliced as bits: bfloat16 is not converted whole on CPU
        logits = precision.einsum("BTKGH,BSKH->BKGTS", query, k, query.dtype, out_dtype=jnp.float32)
        if bias is not None:
            logits = logits + keys(bias, start)
        return _online_softmax_block(carry, logits, live, v)

    num_blocks = jnp.clip((kv_length + block - 1) // block, 0, -(-kv_len // block))
    _, denominator, acc = jax.lax.fori_loop(0, num_blocks, step,
                                            _online_softmax_init(batch, num_kv_heads, groups, q_len, head_dim))
    return _online_softmax_output(denominator, acc, query.dtype)


def _platform() -> str:
    """`runtime.trace_platform`, here so that a benchmark can patch the kernel choice alone."""
    return runtime.trace_platform()


def _on_tpu() -> bool:
    """Whether this trace is for TPU (`_platform`)."""
    return _platform() == "tpu"


def _splash_unsupported(segments, bias, use_dropout) -> str | None:
    """Why splash cannot run this call, or None."""
    if segments is None:
        return "needs a masking.SegmentMask (segment ids, causal, window), not a dense mask array"
    if not segments.default_indices:
        return "needs queries and keys at positions 0, 1, ... (not a decoding step with a cache)"
    if segments.dilation != 1 or segments.global_tokens is not None:
        return "reads no dilated window or global tokens (Longformer's; attention 'banded' does)"
    if bias is not None:
        return "takes no attention bias (relative or ALiBi positions)"
    if use_dropout:
        return "has no attention dropout"
    return None


def _splash_attention(query, key, value, segments: masking.SegmentMask, *, interpret: bool):
    """Splash attention over [B, T, N, H] / [B, S, K, H], sharded over the mesh in context."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as splash, splash_attention_mask as splash_mask)

    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    q_pad, kv_pad = -q_len % SPLASH_BLOCK, -kv_len % SPLASH_BLOCK
    q_total, kv_total = q_len + q_pad, kv_len + kv_pad

    # Segment ids: padding queries are segment 0 (their output is zeroed below); padding keys -1,
    # which no query has, so they are never attended. Rows padded to whole blocks are both.
    q_ids = jnp.ones((batch, q_len), jnp.int32) if segments.query_segments is None else segments.query_segments
    k_ids = jnp.ones((batch, kv_len), jnp.int32) if segments.key_segments is None else segments.key_segments
    q_ids = jnp.pad(jnp.broadcast_to(q_ids.astype(jnp.int32), (batch, q_len)), ((0, 0), (0, q_pad)))
    k_ids = jnp.broadcast_to(k_ids.astype(jnp.int32), (batch, kv_len))
    k_ids = jnp.pad(jnp.where(k_ids == 0, -1, k_ids), ((0, 0), (0, kv_pad)), constant_values=-1)

    shape = (q_total, kv_total)
    if segments.window is not None:
        right = 0 if segments.causal else segments.window - 1
        head_mask = splash_mask.LocalMask(shape, window_size=(segments.window - 1, right), offset=0)
    elif segments.causal:
        head_mask = splash_mask.CausalMask(shape)
    else:
        head_mask = splash_mask.FullMask(shape)
    kernel_heads = groups if num_kv_heads < num_heads else num_heads
    kernel = (splash.make_splash_mqa if num_kv_heads < num_heads else splash.make_splash_mha)(
        splash_mask.MultiHeadMask([head_mask] * kernel_heads), head_shards=1, q_seq_shards=1, interpret=interpret)

    def attend(q, k, v, q_ids, k_ids):  # one shard: [b, T, n, H], [b, S, k, H], [b, T], [b, S] -> [b, T, n, H]
        b = q.shape[0]
        q = jnp.pad(q * jnp.asarray(head_dim**-0.5, q.dtype), ((0, 0), (0, q_pad), (0, 0), (0, 0)))
        k, v = (jnp.transpose(jnp.pad(x, ((0, 0), (0, kv_pad), (0, 0), (0, 0))), (0, 2, 1, 3)) for x in (k, v))
        run = lambda q, k, v, q_ids, k_ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q_ids, k_ids))  # noqa: E731
        if num_kv_heads < num_heads:  # grouped: a multi-query kernel per key/value head
            q = jnp.transpose(q.reshape(b, q_total, -1, groups, head_dim), (0, 2, 3, 1, 4))  # [b, k, G, T, H]
            out = jax.vmap(jax.vmap(run, in_axes=(0, 0, 0, None, None)))(q, k, v, q_ids, k_ids)  # [b, k, G, T, H]
            out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, q_total, -1, head_dim)
        else:
            out = jax.vmap(run)(jnp.transpose(q, (0, 2, 1, 3)), k, v, q_ids, k_ids)  # [b, N, T, H]
            out = jnp.transpose(out, (0, 2, 1, 3))
        out = out[:, :q_len] * (q_ids[:, :q_len] != 0)[:, :, None, None].astype(out.dtype)
        return out.astype(query.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(query, key, value, q_ids, k_ids)
    # A Pallas kernel is opaque to the SPMD partitioner: run it per shard, batch and heads split as
    # the logical rules in context say.
    batch_axes, heads_axes, kv_axes = (nn.logical_to_mesh_axes((name,))[0] for name in ("batch", "heads", "kv_heads"))
    q_spec = jax.sharding.PartitionSpec(batch_axes, None, heads_axes, None)
    kv_spec = jax.sharding.PartitionSpec(batch_axes, None, kv_axes, None)
    ids_spec = jax.sharding.PartitionSpec(batch_axes, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
                         out_specs=q_spec, check_vma=False)(query, key, value, q_ids, k_ids)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (paper, Sec. 3.2.2) with grouped key/value heads and a decoding cache.

    Projections W^Q [D, N, H], W^K, W^V [D, K, H], W^O [N, H, D]; no biases, as in tensor2tensor,
    unless `use_bias` (then b^Q [N, H], b^K, b^V [K, H], b^O [D], as in Marian and fairseq).
    With `decode=True` the keys and values of each call are written into a cache at `decode_index`
    and the queries attend over the whole cache; the caller's mask decides which entries are live.
    Applied with `mutable=["intermediates"]`, it also sows its attention weights [B, N, T, S] float32
    (`attention_weights`) as `intermediates/.../attention_weights`, a one-element tuple.
    `implementation="lsh"` (Reformer, `transformer.reformer`) is self-attention with shared queries
    and keys (k = q / ||q||, no W^K or b^K) and LSH attention; decoding steps with a cache attend
    over the whole cache (full shared-QK attention), and nothing is sown.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    implementation: str = "fused"
    chunk_size: int = 128
    use_rope: bool = False
    use_bias: bool = False
    lsh_num_hashes: int = 2  # "lsh": hash rounds
    lsh_bucket_size: int = 64  # "lsh": queries per sorted chunk
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, *, mask=None, bias=None, query_positions=None, key_positions=None,
                 deterministic: bool = True, decode: bool = False, decode_index=None, static_kv: bool = False):
        """[B, T, D] queries attend to [B, S, D] keys/values -> [B, T, D].

        Args:
          mask, bias: broadcastable to [B, N, T, S] (S = cache length when decoding).
          query_positions, key_positions: [B, T], [B, S] int, used by RoPE.
          decode: write this call's keys/values into the cache at `decode_index` (a scalar).
          static_kv: with `decode`, `inputs_kv` is the same at every step (encoder-decoder
            attention): its keys and values are projected once, when the cache is made, and read
            from the cache afterwards.
        """
        num_kv_heads = self.num_kv_heads or self.num_heads
        d_model = inputs_q.shape[-1]
        shared_qk = self.implementation == "lsh"
        if shared_qk and (inputs_kv is not inputs_q or static_kv):
            raise ValueError("attention 'lsh' is self-attention with shared queries and keys (inputs_kv is inputs_q): "
                             "use another implementation for encoder-decoder attention.")
        param = functools.partial(dense_kernel, self)
        w_q = param("query", (d_model, self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), 0, (1, 2))
        w_k = None if shared_qk else param(
            "key", (d_model, num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
        w_v = param("value", (d_model, num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
        w_o = param("out", (self.num_heads, self.head_dim, d_model), ("heads", "head_dim", "embed"), (0, 1), 2)
        b_q, b_k, b_v, b_o = (None if w is None else self._bias(name, shape, axes) for w, (name, shape, axes) in zip(
            (w_q, w_k, w_v, w_o), (
            ("query_bias", (self.num_heads, self.head_dim), ("heads", "head_dim")),
            ("key_bias", (num_kv_heads, self.head_dim), ("kv_heads", "head_dim")),
            ("value_bias", (num_kv_heads, self.head_dim), ("kv_heads", "head_dim")),
            ("out_bias", (d_model,), ("embed",)))))

        inputs_q, inputs_kv = inputs_q.astype(self.dtype), inputs_kv.astype(self.dtype)
        query = self._project("BTD,DNH->BTNH", inputs_q, w_q, b_q)
        if decode and static_kv:
            key, value = self._static_keys_values(inputs_kv, (w_k, b_k), (w_v, b_v))
            decode = False  # nothing to append: the keys are the encoder's, the same at every step
        else:
            key = reformer.unit_keys(query) if shared_qk else self._project("BSD,DKH->BSKH", inputs_kv, w_k, b_k)
            value = self._project("BSD,DKH->BSKH", inputs_kv, w_v, b_v)
        if self.use_rope:
            query = positional.apply_rope(query, query_positions)
            key = positional.apply_rope(key, key_positions)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))

        beams = 1
        if static_kv and key.shape[0] != query.shape[0]:
            # Beam search: each row's W beams attend to the row's one copy of the encoder's keys
            # (cached once per row, not per beam), as W queries of that row.
            beams = _beams_per_row(query.shape[0], key.shape[0])
            query = _fold_beams(query, beams)
            mask, bias = _row_mask(mask, "mask", key.shape[0]), _row_mask(bias, "bias", key.shape[0])

        kv_length = kv_rows = None
        if decode:
            key, value, kv_rows = self._update_cache(key, value, decode_index)
            if decode_index is not None:
                kv_length = decode_index + query.shape[1]  # cache positions written so far

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        lsh = shared_qk and not decode
        if lsh:
            rng = self.make_rng("lsh") if self.has_rng("lsh") else reformer.fixed_rng(self.path)
            out = reformer.lsh_self_attention(
                query, value, mask, bias, rng=rng, num_hashes=self.lsh_num_hashes, bucket_size=self.lsh_bucket_size,
                dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)  # [B, T, N, H]
        else:
            if shared_qk:  # a decoding step: every cached key, a token's own at reformer.SELF_LOGIT
                bias = reformer.self_logit_bias(mask, bias, query.shape[1], key.shape[1])
            out = dot_product_attention(
                query, key, value, mask, bias, implementation="reference" if shared_qk else self.implementation,
                dropout_rate=self.dropout_rate, dropout_rng=dropout_rng, chunk_size=self.chunk_size,
                kv_length=kv_length, kv_rows=kv_rows)  # [B, T, N, H]
        if self.is_mutable_collection("intermediates") and not lsh:
            # Attention maps, only when the caller asks for them (`apply(..., mutable=["intermediates"])`):
            # otherwise nothing here is traced and the model compiles exactly as without this branch.
            weights = attention_weights(query, beam_rows(key, kv_rows), mask, bias, kv_length=kv_length)  # [B, N, T, S]
            if beams > 1:  # [B, N, W * T, S] -> [B * W, N, T, S]
                rows, heads, _, keys = weights.shape
                weights = weights.reshape(rows, heads, beams, -1, keys).swapaxes(1, 2).reshape(
                    rows * beams, heads, -1, keys)
            self.sow("intermediates", "attention_weights", weights)
        if beams > 1:
            out = out.reshape(out.shape[0] * beams, -1, *out.shape[2:])  # [B, W * T, N, H] -> [B * W, T, N, H]
        out = self._project("BTNH,NHD->BTD", out, w_o, b_o)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _bias(self, name, shape, axes):
        """A zero-initialised float32 bias parameter, or None without `use_bias`."""
        if not self.use_bias:
            return None
        return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.float32)

    def _project(self, equation, x, kernel, bias):
        y = precision.project(equation, x, kernel, self.dtype)
        return y if bias is None else precision.add_bias(y, bias)

    def _static_keys_values(self, inputs_kv, key_weights, value_weights):
        """Keys and values [B, S, K, H] of `inputs_kv`, projected when the cache is made (the first
        decoding call, `decoding.init_cache`), read back from it at every later step."""
        def project(weights):  # called only while the cache is made
            return lambda: self._project("BSD,DKH->BSKH", inputs_kv, *weights)

        key = self.variable("cache", "static_key", project(key_weights))
        value = self.variable("cache", "static_value", project(value_weights))
        return key.value, value.value

    def _update_cache(self, key, value, decode_index):
        """Writes [B, T, K, H] keys/values at `decode_index`; returns the whole cache [B, S, K, H] and
        beam search's row map [B', W, S] (None outside beam search).

        The first call (during `init`) sizes the cache from the given keys and leaves it empty.
        16-bit keys and values are stored as their bits (`precision.as_bits`), so that on CPU the
        write stays in place rather than converting and copying the whole cache at every step.
        Beam search adds the row map (`decoding.add_beam_rows`) and reorders it, never the keys: each
        beam writes its keys into its own row, and reads earlier positions through the map.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", lambda: precision.as_bits(jnp.zeros(key.shape, key.dtype)))
        cached_value = self.variable("cache", "cached_value",
                                     lambda: precision.as_bits(jnp.zeros(value.shape, value.dtype)))
        if not initialized:
            return key, value, None
        start = (0, decode_index, 0, 0)
        for cached, new in ((cached_key, key), (cached_value, value)):
            cached.value = jax.lax.dynamic_update_slice(cached.value, precision.as_bits(new), start)
        rows = None
        if self.has_variable("cache", "cached_rows"):
            cached_rows = self.variable("cache", "cached_rows")
            groups, beams, _ = cached_rows.value.shape
            own = jnp.broadcast_to(jnp.arange(beams, dtype=cached_rows.value.dtype)[None, :, None],
                                   (groups, beams, key.shape[1]))  # the positions just written: each beam's own row
            cached_rows.value = jax.lax.dynamic_update_slice(cached_rows.value, own, (0, 0, decode_index))
            rows = cached_rows.value
        return (precision.from_bits(cached_key.value, key.dtype), precision.from_bits(cached_value.value, value.dtype),
                rows)


def _beams_per_row(query_rows: int, key_rows: int) -> int:
    """W, for B * W query rows (beams) over B rows of encoder keys."""
    if query_rows % key_rows:
        raise ValueError(f"encoder-decoder attention with {query_rows} query rows and {key_rows} rows of encoder "
                         "keys: the query rows must be the key rows or W beams of each (beam-major within a row, "
                         "as decoding.expand_beams makes them).")
    return query_rows // key_rows


def _fold_beams(x, beams: int):
    """[B * W, T, ...] -> [B, W * T, ...]: a row's beams as more queries of that row."""
    return x.reshape(x.shape[0] // beams, beams * x.shape[1], *x.shape[2:])


def _row_mask(x, name: str, rows: int):
    """A mask or bias for beams folded into queries (`_fold_beams`): it must be the same for all
    queries of a row, i.e. [B or 1, N or 1, 1, S] or a SegmentMask of key segments only."""
    if x is None:
        return None
    if isinstance(x, masking.SegmentMask):
        if x.query_segments is None and x.default_indices and not x.causal and x.window is None:
            return x
    elif x.shape[0] in (1, rows) and x.shape[2] == 1:
        return x
    raise ValueError(f"encoder-decoder attention over beams sharing their row's encoder keys needs a {name} that "
                     f"is the same for every query of a row ([{rows} or 1, N or 1, 1, S], or a SegmentMask of key "
                     f"segments only); got {x if isinstance(x, masking.SegmentMask) else x.shape}.")


def dense_kernel(module, name, shape, axes, in_axis=-2, out_axis=-1):
    """The one way this package makes a weight matrix: a float32 parameter `name` of `shape`,
    Glorot-uniform over (`in_axis`, `out_axis`), annotated with logical `axes`. Left in float32:
    `precision.einsum` casts it for the product, and its gradient comes back float32."""
    init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
