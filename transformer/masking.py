"""Attention masks: pure functions returning boolean arrays broadcastable to [B, N, T, S].

True means "query t may attend to key s". Every function returns shape [B, 1, T, S] (B may be 1 when
the mask does not depend on the batch), so masks combine with `&` and broadcast over heads.

The models describe their masks with `SegmentMask` instead: segment ids (padding as segment 0), a
causal flag and a window (optionally dilated, with global tokens: Longformer). Dense kernels expand
it with `.dense()`; a blocked kernel such as splash attention or the banded one
(`transformer.longformer`) reads the structure itself and never builds the [T, S] array.

Legend: B batch, N heads, T query length, S key length.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def padding_mask(query_valid, key_valid):
    """Real queries attend to real keys: [B, T] bool, [B, S] bool -> [B, 1, T, S]."""
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def causal_mask(query_index, key_index):
    """Each query attends to keys at or before its own index (paper, Sec. 3.2.3).

    Args:
      query_index: [T] or [B, T] int, the index of each query in its row (the decoding step when
        decoding with a cache).
      key_index: [S] or [B, S] int.
    Returns:
      [B or 1, 1, T, S] bool.
    """
    query_index, key_index = _batched(query_index), _batched(key_index)
    return key_index[:, None, None, :] <= query_index[:, None, :, None]


def segment_mask(query_segment_ids, key_segment_ids):
    """Packed rows: tokens attend only within their own segment. [B, T], [B, S] int -> [B, 1, T, S]."""
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def sliding_window_mask(query_index, key_index, window: int, dilation: int = 1):
    """Local attention: keys with |query index - key index| < window. Shapes as in `causal_mask`.

    Combined with `causal_mask`, each query sees itself and the `window - 1` keys before it.
    With a `dilation` d (Longformer, Beltagy et al. 2020, Sec. 3.1): keys with |i - j| < window * d
    and (i - j) % d == 0, i.e. `window` keys each side (itself included) spaced d apart.
    """
    query_index, key_index = _batched(query_index), _batched(key_index)
    distance = query_index[:, None, :, None] - key_index[:, None, None, :]
    if dilation == 1:
        return jnp.abs(distance) < window
    return (jnp.abs(distance) < window * dilation) & (distance % dilation == 0)


def limit_global_tokens(global_tokens, max_tokens: int | None):
    """The first `max_tokens` True entries of each row (by position) of a [B, S] bool; None = all."""
    global_tokens = jnp.asarray(global_tokens, bool)
    if max_tokens is None:
        return global_tokens
    return global_tokens & (jnp.cumsum(global_tokens, axis=-1) <= max_tokens)


def global_attention_mask(global_tokens):
    """Longformer's global attention: [B, S] bool -> [B, 1, S, S], True where the query or the key is
    global (a global token attends everywhere and everything attends to it). Self-attention only."""
    global_tokens = jnp.asarray(global_tokens, bool)
    return global_tokens[:, None, :, None] | global_tokens[:, None, None, :]


def combine_masks(*masks):
    """Logical AND of the given masks, ignoring None; None if all are None. Broadcasts shapes."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = combined & mask
    return combined


def _batched(index):
    index = jnp.asarray(index)
    return index[None] if index.ndim == 1 else index


@flax.struct.dataclass
class SegmentMask:
    """Query t attends to key s iff their segments are equal and the key's is not 0 (padding),
    and, if `causal`, key index <= query index, and, with a `window`, |query - key index| < window
    (with a `dilation` d: < window * d and a multiple of d) or either token is global.

    Fields:
      query_segments: [B, T] int, or None: every query in segment 1 (unpacked rows without padding).
      key_segments: [B, S] int (0 = padding, never attended), or None: every key in segment 1.
      query_index, key_index: [T] or [B, T] / [S] or [B, S] int positions for `causal` and `window`;
        None = 0, 1, ... (a decoding step with a cache passes its own).
      dilation: d of the dilated window (Longformer); 1 = contiguous. Needs a window.
      global_tokens: [B, S] bool or None (Longformer's global attention, self-attention only, T = S):
        a global token attends to every key and every query attends to it, still within its segment
        and causally if `causal`. Only with a window (without one, every token already sees all).
      max_global_tokens: at most this many global tokens per row (the "banded" kernel's static slot
        count): a row's later ones (by position) act as ordinary tokens, in every kernel alike.
        None = no limit (the dense kernels; "banded" needs a limit).
    A query of segment 0 attends to nothing: its attention output is zero.
    """

    query_segments: jax.Array | None = None
    key_segments: jax.Array | None = None
    query_index: jax.Array | None = None
    key_index: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    window: int | None = flax.struct.field(pytree_node=False, default=None)
    dilation: int = flax.struct.field(pytree_node=False, default=1)
    global_tokens: jax.Array | None = None
    max_global_tokens: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def default_indices(self) -> bool:
        """Queries and keys at positions 0, 1, ... (no decoding offset): a static block structure."""
        return self.query_index is None and self.key_index is None

    def dense(self, q_len: int, kv_len: int):
        """The boolean mask [B or 1, 1, T, S], or None when nothing is masked."""
        query_index = jnp.arange(q_len) if self.query_index is None else self.query_index
        key_index = jnp.arange(kv_len) if self.key_index is None else self.key_index
        segments = None
        if self.key_segments is not None or self.query_segments is not None:
            q = jnp.ones((1, q_len), jnp.int32) if self.query_segments is None else self.query_segments
            k = jnp.ones((1, kv_len), jnp.int32) if self.key_segments is None else self.key_segments
            segments = segment_mask(q, k) & (k != 0)[:, None, None, :]
        return combine_masks(
            segments,
            causal_mask(query_index, key_index) if self.causal else None,
            self._local(query_index, key_index, q_len, kv_len))

    def _local(self, query_index, key_index, q_len, kv_len):
        """The window (dilated), widened by the global tokens: [B or 1, 1, T, S] bool, or None."""
        if self.window is None:
            if self.dilation != 1 or self.global_tokens is not None:
                raise ValueError(f"SegmentMask: dilation={self.dilation} and global_tokens apply to a sliding "
                                 "window: give a window (or leave them out).")
            return None
        local = sliding_window_mask(query_index, key_index, self.window, self.dilation)
        if self.global_tokens is None:
            return local
        if not self.default_indices or q_len != kv_len or self.global_tokens.shape[-1] != kv_len:
            raise ValueError(f"SegmentMask.global_tokens {self.global_tokens.shape} is for self-attention at "
                             f"positions 0, 1, ...: not for T={q_len} queries against S={kv_len} keys or a "
                             "decoding step with a cache.")
        return local | global_attention_mask(limit_global_tokens(self.global_tokens, self.max_global_tokens))
