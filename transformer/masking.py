"""Attention masks: pure functions returning boolean arrays broadcastable to [B, N, T, S].

True means "query t may attend to key s". Every function returns shape [B, 1, T, S] (B may be 1 when
the mask does not depend on the batch), so masks combine with `&` and broadcast over heads.

Legend: B batch, N heads, T query length, S key length.
"""

from __future__ import annotations

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


def sliding_window_mask(query_index, key_index, window: int):
    """Local attention: keys with |query index - key index| < window. Shapes as in `causal_mask`.

    Combined with `causal_mask`, each query sees itself and the `window - 1` keys before it.
    """
    query_index, key_index = _batched(query_index), _batched(key_index)
    distance = query_index[:, None, :, None] - key_index[:, None, None, :]
    return jnp.abs(distance) < window


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
