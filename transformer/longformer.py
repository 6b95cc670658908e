"""Longformer attention (Beltagy et al. 2020): a sliding window computed band by band, with dilation
and global tokens, in O(T * window) time and memory rather than a masked [T, S] matrix.

The keys a query sees are those of `masking.SegmentMask` (whose `.dense()` is the exact dense
equivalent, the parity reference):
  * local: |i - j| < window * d and (i - j) % d == 0, with d the mask's `dilation` (Sec. 3.1);
  * global (Sec. 3.1, "Global Attention"): a global token attends to every key, and every query
    attends to it;
  * always: the same segment, a key that is not padding (segment 0), and j <= i when `causal`.

How. Positions are regrouped by their residue modulo d (t = a * d + r -> [r, a]), which turns the
dilated window into a plain window of `window` within each residue class; each class is cut into
blocks of `window` queries, and a block attends to the keys of its own block and of its neighbours
(only the previous one when causal): J = 3 (2) windows of keys per query, with the exact mask applied
inside the band. The E = `max_global_tokens` slots of a row hold its global tokens (found by
`top_k`): every query also attends to their keys (E more per query), and their own queries attend to
all S keys, O(E * T). A global key inside a query's band is masked out of the band, so it counts
once. A row with more global tokens keeps its first E (by position) global; the others act as local
tokens (`masking.limit_global_tokens`, which `.dense()` applies too), since shapes are static and a
traced mask cannot raise.

Legend: attention.py's letters (B, T, S, N, K, G, H), plus R residues modulo the dilation, C blocks
per residue, Q queries per block (the window), J band keys per block, E global-token slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer import dropout, masking, precision

# As attention._MASKED (this module sits below attention.py, which imports it): a large finite
# negative rather than -inf, so fully masked rows stay NaN-free.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def banded_attention(query, key, value, mask: masking.SegmentMask, *, dropout_rate: float = 0.0, dropout_rng=None):
    """softmax(Q K^T / sqrt(d_k)) V over the keys `mask` allows, band by band (self-attention).

    Args:
      query: [B, T, N, H].
      key, value: [B, T, K, H] (the same positions as the queries), N a multiple of K.
      mask: a `masking.SegmentMask` with a `window`, default indices (positions 0, 1, ...), and, with
        `global_tokens`, a `max_global_tokens` (the number of global slots per row, static).
      dropout_rate, dropout_rng: dropout on the attention weights, when `dropout_rng` is given.
    Returns:
      [B, T, N, H] in the query's dtype; zeros for a query that sees no key (padding).
    """
    _check(query, key, value, mask)
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    dtype = query.dtype
    q_seg, k_seg = (jnp.broadcast_to(jnp.ones((1, length), jnp.int32) if s is None else s.astype(jnp.int32),
                                     (batch, length)) for s in (mask.query_segments, mask.key_segments))
    query = query * jnp.asarray(head_dim**-0.5, dtype)
    glob = None
    if mask.global_tokens is not None and mask.max_global_tokens:
        glob = jnp.broadcast_to(masking.limit_global_tokens(mask.global_tokens, mask.max_global_tokens),
                                (batch, length))
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    local_rng, global_rng = jax.random.split(dropout_rng) if use_dropout else (None, None)

    # Local queries: their band, plus the global keys.
    layout = _Layout(length, mask.window, mask.dilation, mask.causal)
    q_r = layout.regroup(query).reshape(*layout.shape(batch), num_kv_heads, groups, head_dim)  # [B, R, C, Q, K, G, H]
    q_seg_r = layout.regroup(q_seg)  # [B, R, C, Q]
    # A global key is left out of the band (segment 0 there): it is attended as a global key below.
    k_seg_band = layout.band(layout.regroup(k_seg if glob is None else jnp.where(glob, 0, k_seg)))  # [B, R, C, J]
    band_mask = ((q_seg_r[..., :, None] == k_seg_band[..., None, :]) & (k_seg_band != 0)[..., None, :]
                 & layout.band_mask())  # [B, R, C, Q, J]
    logits = precision.einsum("BRCQKGH,BRCJKH->BKGRCQJ", q_r, layout.band(layout.regroup(key)), dtype,
                              out_dtype=jnp.float32)
    logits, masks = [logits], [band_mask[:, None, None]]
    if glob is not None:
        slots = _GlobalSlots(glob, mask.max_global_tokens, q_seg, k_seg)
        global_keys, global_values = slots.gather(key), slots.gather(value)  # [B, E, K, H]
        logits.append(precision.einsum("BRCQKGH,BEKH->BKGRCQE", q_r, global_keys, dtype, out_dtype=jnp.float32))
        global_mask = (q_seg_r[..., None] == slots.key_segments[:, None, None, None, :]) & (
                slots.key_segments != 0)[:, None, None, None, :]  # [B, R, C, Q, E]
        if mask.causal:
            positions = layout.regroup(jnp.arange(length)[None])  # [1, R, C, Q]
            global_mask = global_mask & (slots.index[:, None, None, None, :] <= positions[..., None])
        masks.append(global_mask[:, None, None])
    weights = _softmax(jnp.concatenate(logits, -1), jnp.concatenate(masks, -1), dropout_rate, local_rng)
    band_width = band_mask.shape[-1]
    out = precision.einsum("BKGRCQJ,BRCJKH->BRCQKGH", weights[..., :band_width],
                           layout.band(layout.regroup(value)), dtype)
    if glob is not None:
        out = out + precision.einsum("BKGRCQE,BEKH->BRCQKGH", weights[..., band_width:], global_values, dtype)
    out = layout.ungroup(out.reshape(*out.shape[:4], num_heads, head_dim))  # [B, T, N, H]

    if glob is not None:  # Global queries: all S keys, written over their local rows.
        q_g = slots.gather(query).reshape(batch, -1, num_kv_heads, groups, head_dim)  # [B, E, K, G, H]
        logits = precision.einsum("BEKGH,BSKH->BKGES", q_g, key, dtype, out_dtype=jnp.float32)
        global_mask = ((slots.query_segments[:, :, None] == k_seg[:, None, :]) & (k_seg != 0)[:, None, :]
                       & slots.valid[:, :, None])  # [B, E, S]
        if mask.causal:
            global_mask = global_mask & (jnp.arange(length)[None, None, :] <= slots.index[:, :, None])
        weights = _softmax(logits, global_mask[:, None, None], dropout_rate, global_rng)
        out_g = precision.einsum("BKGES,BSKH->BEKGH", weights, value, dtype).reshape(batch, -1, num_heads, head_dim)
        out = jnp.where(glob[:, :, None, None], slots.scatter(out_g), out)
    return out.astype(dtype)


def _check(query, key, value, mask):
    """Raises ValueError for a call this kernel cannot serve, saying what to use instead."""
    if not isinstance(mask, masking.SegmentMask) or mask.window is None:
        raise ValueError("banded attention needs a masking.SegmentMask with a window (local attention); "
                         f"got {type(mask).__name__}: use 'fused', 'reference' or 'chunked' for other masks.")
    if not mask.default_indices or key.shape[1] != query.shape[1] or value.shape != key.shape:
        raise ValueError(f"banded attention is self-attention at positions 0, 1, ...: query {query.shape}, "
                         f"key {key.shape}, value {value.shape}, default indices: {mask.default_indices}.")
    if mask.global_tokens is not None and not mask.max_global_tokens:
        raise ValueError("banded attention gathers global tokens into a static number of slots: give the "
                         "SegmentMask a max_global_tokens (ModelConfig.max_global_tokens).")


class _Layout:
    """Positions [T] as [R, C, Q]: residue r = t % d, then blocks of Q = window along t // d.

    `regroup` / `ungroup` convert [B, T, ...] <-> [B, R, C, Q, ...] (zero padding T up to R * C * Q,
    which is segment 0: never attended); `band` gathers each block's keys [B, R, C, J, ...]: the
    blocks at offsets -1, 0 (, +1) from it, concatenated.
    """

    def __init__(self, length: int, window: int, dilation: int, causal: bool):
        per_residue = -(-length // dilation)
        self.length, self.window, self.dilation, self.causal = length, window, dilation, causal
        self.block = min(window, per_residue)  # one short block when a whole residue fits in the window
        self.num_blocks = -(-per_residue // self.block)
        # Neighbouring blocks cover every |distance| < window, since block = window; a single block
        # has none.
        self.offsets = (0,) if self.num_blocks == 1 else (-1, 0) if causal else (-1, 0, 1)

    def shape(self, batch):
        return batch, self.dilation, self.num_blocks, self.block

    def regroup(self, x):
        """[B, T, ...] -> [B, R, C, Q, ...]; position t = (c * Q + q) * R + r."""
        padded = self.dilation * self.num_blocks * self.block
        x = jnp.pad(x, ((0, 0), (0, padded - self.length)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape(x.shape[0], self.num_blocks, self.block, self.dilation, *x.shape[2:])  # [B, C, Q, R, ...]
        return jnp.moveaxis(x, 3, 1)

    def ungroup(self, x):
        """[B, R, C, Q, ...] -> [B, T, ...]."""
        x = jnp.moveaxis(x, 1, 3)
        return x.reshape(x.shape[0], -1, *x.shape[4:])[:, :self.length]

    def band(self, x):
        """[B, R, C, Q, ...] -> [B, R, C, J, ...], J = len(offsets) * Q; blocks outside are zeros."""
        padded = jnp.pad(x, ((0, 0), (0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 3))
        return jnp.concatenate([padded[:, :, 1 + o:1 + o + self.num_blocks] for o in self.offsets], axis=3)

    def band_mask(self):
        """[Q, J] bool: within the window (and causal) by the distance a - b inside the residue."""
        query = jnp.arange(self.block)[:, None]
        key = jnp.arange(self.block)[None, :]
        parts = []
        for offset in self.offsets:
            distance = query - (key + offset * self.block)
            parts.append((jnp.abs(distance) < self.window) & ((distance >= 0) if self.causal else True))
        return jnp.concatenate(parts, axis=1)


class _GlobalSlots:
    """A row's global tokens in E fixed slots: `index` [B, E] their positions, `valid` [B, E] which
    slots hold one (a row with fewer leaves the rest empty), and their segments [B, E] (0 if empty).

    NOTE: slots are read and written with one-hot products (`one_hot` [B, E, T]; exact) rather than
    gathers and scatters: O(T * E), as the global rows' attention itself, quicker to compile and to
    differentiate, and matrix-unit work on accelerators.
    """

    def __init__(self, glob, max_tokens: int, q_seg, k_seg):
        """glob [B, T] bool with at most `max_tokens` True per row (masking.limit_global_tokens)."""
        batch, length = glob.shape
        # top_k of a 0/1 row: the positions of its ones (all of them, as there are at most E), then zeros.
        flags, self.index = jax.lax.top_k(glob.astype(jnp.int32), min(max_tokens, length))
        self.valid = flags > 0
        # [B, E, T] rather than [B, T, E]: XLA:CPU has no bfloat16 -> float32 dot for "BTE,BTNH->BENH".
        self.one_hot = (self.index[:, :, None] == jnp.arange(length)[None, None, :]) & self.valid[:, :, None]
        rows = jnp.arange(batch)[:, None]
        self.query_segments = jnp.where(self.valid, q_seg[rows, self.index], 0)
        self.key_segments = jnp.where(self.valid, k_seg[rows, self.index], 0)

    def gather(self, x):
        """[B, T, N, H] -> [B, E, N, H]: the slots' rows (zeros in empty slots)."""
        return precision.einsum("BET,BTNH->BENH", self.one_hot.astype(x.dtype), x, x.dtype)

    def scatter(self, x):
        """[B, E, N, H] -> [B, T, N, H]: each slot's row at its position, zeros elsewhere."""
        return precision.einsum("BET,BENH->BTNH", self.one_hot.astype(x.dtype), x, x.dtype)


def _softmax(logits, mask, dropout_rate, dropout_rng):
    """Softmax over the last axis in float32, 0 on masked keys (a fully masked row is all 0), then
    dropout on the weights when `dropout_rng` is given."""
    weights = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    weights = jnp.where(mask, weights, 0.0)
    if dropout_rng is not None:
        weights = dropout.apply(dropout_rng, weights, dropout_rate)
    return weights
