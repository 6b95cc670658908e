"""Transformer-XL's segment-level recurrence (Dai et al. 2019, Sec. 3.2): pure functions of the memory.

A DecoderOnly model with `ModelConfig.memory_length = M > 0` keeps, in the flax variable collection
"memory", what each layer read from the previous segment:

    memory/decoder/valid               [B, M] bool     which slots hold a state (False: nothing yet)
    memory/decoder/layer_<i>/hidden    [B, M, D]       layer i's *input* at those positions
    (scan_layers: memory/decoder/layers/hidden [L, B, M, D])

Each layer attends over [memory; segment] (keys and values of both, queries of the segment only),
the memory under stop-gradient (the paper's SG(h^{n-1}_{tau})), and, when the caller applies with
`mutable=["memory"]`, replaces it with the last M of [memory; segment] inputs. Positions are relative
(RoPE, T5 bias, ALiBi): the segment's queries sit at M, ..., M + T - 1 and the memory's keys at
0, ..., M - 1, so a key one position before the segment is at distance 1 from its first query.

    memory = empty_memory(model, batch_size=B)                      # all slots invalid
    logits, updates = model.apply({"params": p, "memory": memory}, targets_k, inputs=inputs_k,
                                  mutable=["memory"])
    memory = updates["memory"]                                      # for segment k + 1

M is the memory's own length: `empty_memory` of a model whose config has a longer memory_length
(the parameters do not depend on it) gives a longer evaluation memory (the paper evaluates with a
longer memory than it trains with).

Legend: B batch, T segment length, M memory length, D model dim, L layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import masking

AXES = ("batch", "length", "embed")  # logical axes of a layer's hidden memory [B, M, D]


def extend(memory, segment):
    """The last M positions of [memory; segment]: [B, M, ...], [B, T, ...] -> [B, M, ...]."""
    length = memory.shape[1]
    return jnp.concatenate([memory, segment.astype(memory.dtype)], axis=1)[:, -length:]


def key_positions(positions, memory_length: int):
    """Positions of the keys [memory; segment]: [B, T] -> [B, M + T]; the memory's are the M
    positions just before the segment's first (with default positions: 0, ..., M - 1)."""
    before = positions[:, :1] - memory_length + jnp.arange(memory_length, dtype=positions.dtype)[None]  # [B, M]
    return jnp.concatenate([before, positions], axis=1)


def attention_mask(valid, length: int, window: int | None = None) -> masking.SegmentMask:
    """Self-attention over [memory; segment]: every valid memory slot, then causal within the segment.

    Args:
      valid: [B, M] bool, the memory slots that hold a state.
      length: T, the segment length.
      window: a sliding window over the M + T key indices (None = none).
    Returns:
      a SegmentMask for [B, 1, T, M + T]: query t (index M + t) attends key j iff j <= M + t,
      and j >= M or valid[:, j].
    """
    batch, memory_length = valid.shape
    key_segments = jnp.concatenate([valid.astype(jnp.int32), jnp.ones((batch, length), jnp.int32)], axis=1)
    return masking.SegmentMask(None, key_segments, query_index=memory_length + jnp.arange(length),
                               key_index=jnp.arange(memory_length + length), causal=True, window=window)


def empty_memory(model, batch_size: int) -> Any:
    """The "memory" collection of `model` (a DecoderOnly with memory_length > 0) for `batch_size`
    rows, every slot invalid. Nothing is computed: shapes come from `jax.eval_shape`."""
    dummy = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))
    if "memory" not in shapes:
        raise ValueError(f"{type(model).__name__} keeps no memory: set ModelConfig.memory_length > 0 "
                         "(DecoderOnly only).")
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), unbox(shapes["memory"]))


def reset_rows(memory, reset):
    """`memory` with the rows where `reset` [B] is true emptied (a stream that starts over).

    Only the validity flags change ([B, M], or [L, B, M] when scanned: the batch axis is -2);
    an invalid slot's state is never attended."""
    def clear(path, leaf):
        if _name(path) != "valid":
            return leaf
        return leaf & ~reset.astype(bool)[:, None]
    return jax.tree_util.tree_map_with_path(clear, memory)


def unbox(tree):
    """`tree` without flax's logical-partitioning boxes (the memory is created boxed, for sharding)."""
    return nn.meta.unbox(tree)


def _name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))
