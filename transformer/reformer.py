"""Reformer (Kitaev et al. 2020): LSH attention (Sec. 2) and reversible residual layers (Sec. 3).

LSH attention. Queries and keys are shared (k_j = q_j / ||q_j||). Each of R hash rounds draws a
random rotation per head and puts every token in the bucket argmax([xR; -xR]) (angular LSH,
Andoni et al. 2015). Tokens are sorted by (bucket, position) and cut into chunks of M =
`bucket_size`; each chunk's queries attend to the keys of their own chunk and of the chunk before
that hold the same bucket, so memory is O(R * T * M) rather than O(T^2). Rounds are combined by
their softmax normalisers (the paper's eqs. 4-6): each round's output weighted by softmax over
rounds of its logsumexp, with a key attended in k rounds counted once (its logit lowered by log k,
as trax does), so the result is the softmax over the union of the rounds' keys.

Reversible layers. A stack of pre-norm sub-layers f_1, f_2, ... (attention, feed-forward; the
decoder's encoder-decoder attention too) runs on two halves (a, b), starting from (x, x):
each step is (a, b) -> (b, a + f_k(b)), so one layer gives y1 = x1 + F(x2), y2 = x2 + G(y1) (RevNet,
Gomez et al. 2017), and the output is (a + b) / 2. The backward pass recomputes each step's input
from its output (b_prev = a, a_prev = b - f_k(a)), so activation memory stays flat as depth grows.

Axis legend (transformer.attention's, plus): R hash rounds, C chunks per round, M chunk length,
S = 2M keys a chunk attends to (its own and the previous chunk's).
"""

from __future__ import annotations

import functools
import inspect
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import dropout, masking, precision
from transformer.config import ModelConfig

SELF_LOGIT = -1e5  # a token's logit for itself: attended only when nothing else is (paper, Sec. 2; trax)
_MASKED = -1e9  # keys in another bucket, segment, the future, or padding (trax's value)


# ---------------------------------------------------------------------------------------------
# LSH attention.


def num_buckets_for(length: int, bucket_size: int) -> int:
    """Buckets per round for `length` tokens: 2 per chunk (the paper's m = 2l / n_buckets), counting
    a last, partial chunk; 1 when everything fits in one chunk (then LSH attention is exact)."""
    chunks = -(-length // bucket_size)
    return 1 if chunks == 1 else 2 * chunks


def random_rotations(rng, num_heads: int, head_dim: int, num_hashes: int, num_buckets: int):
    """The random projections of angular LSH: [N, H, R, num_buckets / 2] float32, one per head and round."""
    return jax.random.normal(rng, (num_heads, head_dim, num_hashes, num_buckets // 2), jnp.float32)


def hash_buckets(query_key, rotations, num_buckets: int, block: int = 1024):
    """Bucket ids argmax([xR; -xR]): query_key [B, T, N, H], rotations [N, H, R, num_buckets / 2]
    -> [B, N, R, T] int32 in [0, num_buckets).

    NOTE: the projections xR are [T, num_buckets / 2] per head and round, and num_buckets grows with
    T, so they are computed `block` tokens at a time (T a multiple of `block` or at most `block`).
    """
    batch, length, heads, _ = query_key.shape
    if num_buckets == 1:
        return jnp.zeros((batch, heads, rotations.shape[2], length), jnp.int32)

    def hash_block(x):  # [B, t, N, H] -> [B, N, R, t]
        rotated = jnp.einsum("BTNH,NHRU->BNRTU", x.astype(jnp.float32), rotations)
        return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)

    if length <= block or length % block:
        return hash_block(query_key)
    blocks = jnp.moveaxis(query_key.reshape(batch, length // block, block, *query_key.shape[2:]), 1, 0)
    buckets = jax.lax.map(hash_block, jax.lax.stop_gradient(blocks))  # [T / block, B, N, R, block]
    return jnp.moveaxis(buckets, 0, 3).reshape(batch, heads, -1, length)


def unit_keys(query_key):
    """Shared-QK keys k = q / ||q|| over the head axis (trax's length normalisation, eps 1e-6 on mean(q^2))."""
    q = query_key.astype(jnp.float32)
    k = q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + 1e-6) / jnp.sqrt(q.shape[-1])
    return k.astype(query_key.dtype)


def lsh_attention(query_key, value, *, rng=None, rotations=None, num_hashes: int = 2, bucket_size: int = 64,
                  causal: bool = False, segment_ids=None, num_buckets: int | None = None,
                  dropout_rate: float = 0.0, dropout_rng=None):
    """Shared-QK LSH self-attention: softmax(q_i . k_j / sqrt(H)) over the keys j that share a bucket
    and a chunk window with i in some hash round.

    Args:
      query_key: [B, T, N, H] shared queries/keys (the keys are normalised here).
      value: [B, T, N, Hv].
      rng: draws the rotations (`random_rotations`); or pass `rotations` [N, H, R, num_buckets / 2].
      num_hashes: R, hash rounds (with `rng`).
      bucket_size: M, queries per sorted chunk. T need not be a multiple: the sequence is padded to
        whole chunks with padding tokens, which hash past every real bucket and are never attended.
      causal: keys at positions <= the query's only.
      segment_ids: [B, T] int, 0 = padding: keys of the query's own nonzero segment only (packed
        rows); None = one segment. Padding queries get a zero output.
      num_buckets: buckets per round; default `num_buckets_for(T, bucket_size)`; 1 or even.
      dropout_rate, dropout_rng: dropout on the attention weights when `dropout_rng` is given.
    Returns:
      [B, T, N, Hv] in value's dtype.

    Self-attention is kept only when no other key is available (logit SELF_LOGIT, not -inf), and a
    key found in several rounds is counted once (see the module docstring). NOTE: causal masking
    removes every later key, so out[t] has no gradient path from later tokens and does not change
    with their values; but, as in the Reformer, later tokens take places in the sorted chunks, so
    which earlier keys share t's chunk can depend on the hashes of later tokens.
    """
    batch, length, num_heads, head_dim = query_key.shape
    if value.shape[:3] != (batch, length, num_heads):
        raise ValueError(f"value {value.shape} must be [B, T, N, Hv] matching query_key {query_key.shape}.")
    chunk = min(bucket_size, length)
    padded = -(-length // chunk) * chunk
    num_buckets = num_buckets_for(length, chunk) if num_buckets is None else num_buckets
    if num_buckets != 1 and num_buckets % 2:
        raise ValueError(f"num_buckets={num_buckets} must be 1 or even (angular LSH: argmax over [xR; -xR]).")
    if rotations is None:
        rotations = random_rotations(rng, num_heads, head_dim, num_hashes, num_buckets)
    if rotations.shape[:2] != (num_heads, head_dim) or 2 * rotations.shape[3] != num_buckets - num_buckets % 2:
        raise ValueError(f"rotations {rotations.shape} must be [N, H, R, num_buckets / 2] = "
                         f"[{num_heads}, {head_dim}, R, {num_buckets // 2}].")
    segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = padded - length
    query_key, value = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (query_key, value))
    segments = jnp.pad(segments, ((0, 0), (0, pad)))  # [B, T'], the padding in segment 0

    buckets = hash_buckets(query_key, rotations, num_buckets)  # [B, N, R, T']
    # Padding sorts after every real bucket, so it never takes a real token's place in a chunk.
    buckets = jnp.where(segments[:, None, None, :] != 0, buckets, num_buckets)
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    # One dropout key per row and head; without dropout a placeholder that _lsh_head never reads.
    rngs = jax.random.split(dropout_rng, (batch, num_heads)) if use_dropout else jnp.zeros((batch, num_heads))
    head = functools.partial(_lsh_head, chunk=chunk, causal=causal, dropout_rate=dropout_rate if use_dropout else 0.0)
    per_batch = jax.vmap(head, in_axes=(0, 0, 0, None, 0))  # over heads
    out = jax.vmap(per_batch)(jnp.moveaxis(query_key, 2, 1), jnp.moveaxis(value, 2, 1), buckets, segments,
                              rngs)  # [B, N, T', Hv]
    out = jnp.moveaxis(out, 1, 2)[:, :length]  # [B, T, N, Hv]
    return (out * (segments[:, :length] != 0)[:, :, None, None]).astype(value.dtype)


def _lsh_head(query_key, value, buckets, segments, dropout_rng, *, chunk, causal, dropout_rate):
    """One head of one row: query_key [T, H], value [T, Hv], buckets [R, T], segments [T] -> [T, Hv]."""
    num_hashes, length = buckets.shape
    num_chunks = length // chunk
    head_dim = query_key.shape[-1]
    positions = jnp.arange(length)
    order = jnp.argsort(buckets * length + positions, axis=-1)  # [R, T]: sorted by (bucket, position)
    rank = jnp.argsort(order, axis=-1)  # [R, T]: each token's place in its round's sorted order

    def chunked(x):  # [R, T, ...] -> [R, C, M, ...]
        return x.reshape(num_hashes, num_chunks, chunk, *x.shape[2:])

    def with_previous(x):  # [R, C, M, ...] -> [R, C, S, ...]: each chunk, then the one before it
        return jnp.concatenate([x, jnp.roll(x, 1, axis=1)], axis=2)

    q_pos = chunked(order)  # [R, C, M]
    q_bucket = chunked(jnp.take_along_axis(buckets, order, axis=-1))
    q_segment = chunked(segments[order])
    query = chunked(query_key[order])  # [R, C, M, H]
    k_pos, k_bucket, k_segment = (with_previous(x) for x in (q_pos, q_bucket, q_segment))  # [R, C, S]
    key, val = with_previous(chunked(unit_keys(query_key)[order])), with_previous(chunked(value[order]))

    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    logits = precision.einsum("RCMH,RCSH->RCMS", query, key, query.dtype, out_dtype=jnp.float32)
    is_previous = jnp.arange(2 * chunk) >= chunk  # [S]
    in_window = ~is_previous | (jnp.arange(num_chunks) > 0)[:, None]  # [C, S]: chunk 0 has no previous chunk
    attend = (in_window[None, :, None, :] & (k_bucket[..., None, :] == q_bucket[..., None])
              & (k_segment[..., None, :] == q_segment[..., None]) & (k_segment[..., None, :] != 0))
    if causal:
        attend = attend & (k_pos[..., None, :] <= q_pos[..., None])
    logits = jnp.where(k_pos[..., None, :] == q_pos[..., None], SELF_LOGIT, logits)
    if num_hashes > 1:
        logits = logits - jnp.log(jnp.maximum(_times_attended(buckets, rank // chunk, q_pos, k_pos), 1))
    logits = jnp.where(attend, logits, _MASKED)  # [R, C, M, S]
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [R, C, M]
    weights = jnp.exp(logits - normaliser[..., None])
    if dropout_rate > 0.0:
        weights = dropout.apply(dropout_rng, weights, dropout_rate)
    out = precision.einsum("RCMS,RCSH->RCMH", weights.astype(val.dtype), val, val.dtype, out_dtype=jnp.float32)
    # Back to positions: [R, T, Hv] and [R, T]; then the rounds, weighted by their normalisers.
    out = jnp.take_along_axis(out.reshape(num_hashes, length, -1), rank[..., None], axis=1)
    normaliser = jnp.take_along_axis(normaliser.reshape(num_hashes, length), rank, axis=1)
    return jnp.einsum("RT,RTH->TH", jax.nn.softmax(normaliser, axis=0), out)


def _times_attended(buckets, chunks, q_pos, k_pos):
    """In how many rounds each query attends to each key of its window: [R, C, M, S] int32.

    Round r' pairs query i with key j when they share a bucket and j's chunk is i's or the one
    before. buckets, chunks: [R, T] per token; q_pos [R, C, M], k_pos [R, C, S]: the window's tokens.
    """
    q_bucket, q_chunk = buckets[:, q_pos][..., :, None], chunks[:, q_pos][..., :, None]  # [R', R, C, M, 1]
    k_bucket, k_chunk = buckets[:, k_pos][..., None, :], chunks[:, k_pos][..., None, :]  # [R', R, C, 1, S]
    paired = (q_bucket == k_bucket) & ((k_chunk == q_chunk) | (k_chunk == q_chunk - 1))
    return jnp.sum(paired, axis=0, dtype=jnp.int32)


def fixed_rng(path) -> jax.Array:
    """The rotations' key when a call has no 'lsh' rng: fixed per module path (evaluation is deterministic)."""
    return jax.random.key(zlib.crc32("/".join(path).encode()))


def lsh_self_attention(query, value, mask, bias, *, rng, num_hashes, bucket_size, dropout_rate=0.0,
                       dropout_rng=None):
    """`lsh_attention` as MultiHeadAttention calls it: mask a `masking.SegmentMask` (segment ids with
    padding as 0, `causal`) or None. query [B, T, N, H], value [B, T, N, H] -> [B, T, N, H]."""
    if bias is not None:
        raise ValueError("attention='lsh' takes no attention bias (relative or ALiBi positions): use "
                         "position='sinusoidal', 'learned' or 'rope'.")
    if mask is None:
        mask = masking.SegmentMask()
    if (not isinstance(mask, masking.SegmentMask) or not mask.default_indices or mask.window is not None
            or getattr(mask, "global_tokens", None) is not None):
        raise ValueError("attention='lsh' needs a masking.SegmentMask of segment ids and a causal flag only (no "
                         f"window, global tokens or decoding indices), got {mask!r:.200}.")
    segments = mask.key_segments if mask.key_segments is not None else mask.query_segments
    return lsh_attention(query, value, rng=rng, num_hashes=num_hashes, bucket_size=bucket_size, causal=mask.causal,
                         segment_ids=segments, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def self_logit_bias(mask, bias, q_len: int, kv_len: int):
    """`bias` (or None) plus SELF_LOGIT where key index = query index: [1 or B, 1 or N, T, S] float32.

    For shared-QK decoding steps with a cache, which attend over the whole cache (full shared-QK
    attention, a superset of the keys LSH attention would pick). Adding SELF_LOGIT rather than
    setting it gives the same weights: a token's own key still weighs 0 unless it is the only one.
    mask: a `masking.SegmentMask` whose query_index / key_index place the step in the cache, or None.
    """
    query_index = getattr(mask, "query_index", None)
    key_index = getattr(mask, "key_index", None)
    query_index = jnp.atleast_2d(jnp.arange(q_len) if query_index is None else query_index)  # [B or 1, T]
    key_index = jnp.atleast_2d(jnp.arange(kv_len) if key_index is None else key_index)  # [B or 1, S]
    same = key_index[:, None, None, :] == query_index[:, None, :, None]
    own = jnp.where(same, SELF_LOGIT, 0.0).astype(jnp.float32)
    return own if bias is None else bias.astype(jnp.float32) + own


# ---------------------------------------------------------------------------------------------
# Reversible residual layers.


def reversible_sequence(functions, params, x1, x2, context, rngs):
    """The reversible steps (a, b) -> (b, a + f_k(b)) from (x1, x2), with a backward pass that keeps
    no activations: it recomputes each step's input from its output.

    Args:
      functions: f_k(params_k, h [B, T, D], context, rngs_k) -> [B, T, D], pure.
      params, rngs: one entry per function (the same dropout rngs in the backward recomputation).
      x1, x2: [B, T, D], the starting halves.
      context: a pytree every step reads (masks, positions, encoder output); float leaves get gradients.
    Returns:
      (a, b) after the last step, each [B, T, D].
    """

    @jax.custom_vjp
    def run(params, x1, x2, context, rngs):
        for f, p, r in zip(functions, params, rngs):
            x1, x2 = x2, x1 + f(p, x2, context, r)
        return x1, x2

    def forward(params, x1, x2, context, rngs):
        a, b = run(params, x1, x2, context, rngs)
        return (a, b), (params, a, b, context, rngs)  # the last outputs only, not one per step

    def backward(residuals, cotangents):
        params, a, b, context, rngs = residuals
        da, db = cotangents
        grads, d_context = [None] * len(functions), None
        for k in reversed(range(len(functions))):
            # NOTE: the barrier keeps XLA from merging this recomputation with the forward pass's
            # (identical) one, which would keep the forward activations alive until here.
            a, b = jax.lax.optimization_barrier((a, b))
            out, vjp = jax.vjp(lambda p, h, c: functions[k](p, h, c, rngs[k]), params[k], a, context)
            grads[k], dh, dc = vjp(db)
            d_context = dc if d_context is None else jax.tree.map(_add_cotangents, d_context, dc)
            a, b = b - out, a  # the step's input: a_prev = b - f_k(b_prev), b_prev = a
            da, db = db, da + dh
        return tuple(grads), da, db, d_context, None

    run.defvjp(forward, backward)
    return run(tuple(params), x1, x2, context, tuple(rngs))


def _add_cotangents(x, y):
    return x if x.dtype == jax.dtypes.float0 else x + y  # integer inputs (masks, positions): float0 zeros


class Sublayers(nn.Module):
    """One layer's pre-norm sub-layers as residual functions f(h) = Dropout(Sublayer(Norm(h))), with the
    parameter names of `layers.EncoderLayer` / `layers.DecoderLayer` ("self_attention", "self_attention_norm",
    "cross_attention", ..., "feed_forward")."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h, context, *, branch: str, deterministic: bool, decode: bool = False, decode_index=None):
        """h [B, T, D] -> f_branch(h) [B, T, D]; context: a dict with mask, bias, positions (and
        encoded, cross_mask for encoder-decoder attention)."""
        from transformer import layers  # noqa: PLC0415  (layers -> attention -> this module)

        cfg = self.config
        x = layers.make_norm(cfg, name=f"{branch}_norm")(h)
        if branch == "self_attention":
            attention = layers._attention(cfg, "self_attention", use_rope=cfg.position == "rope")
            x = attention(x, x, mask=context["mask"], bias=context["bias"], query_positions=context["positions"],
                          key_positions=context["positions"], deterministic=deterministic, decode=decode,
                          decode_index=decode_index)
        elif branch == "cross_attention":
            attention = layers._attention(cfg, "cross_attention", use_rope=False)
            x = attention(x, context["encoded"], mask=context["cross_mask"], deterministic=deterministic,
                          decode=decode, static_kv=True)
        else:
            x = layers._feed_forward(cfg)(x)
        return dropout.Dropout(cfg.dropout_rate, name=f"{branch}_dropout")(x, deterministic=deterministic)


class ReversibleStack(nn.Module):
    """`num_layers` layers of `branches` sub-layers as reversible steps; output (a + b) / 2 [B, T, D].

    Averaging the halves (rather than trax's concatenation) keeps the width D for the final norm
    and the output projection. Parameters live under layer_{i}/<sub-layer>, as in the ordinary stack.
    """

    config: ModelConfig
    num_layers: int
    branches: tuple[str, ...] = ("self_attention", "feed_forward")

    @nn.compact
    def __call__(self, x, context, *, deterministic: bool, decode: bool = False, decode_index=None):
        blocks = [Sublayers(self.config, name=f"layer_{i}") for i in range(self.num_layers)]
        if decode or self.is_initializing():
            # Initialisation (creates the parameters and caches) and decoding steps (update the caches):
            # the same steps on the bound modules; nothing here is differentiated.
            a = b = x
            for block in blocks:
                for branch in self.branches:
                    a, b = b, a + block(b, context, branch=branch, deterministic=deterministic, decode=decode,
                                        decode_index=decode_index)
            return (a + b) / 2
        params = self.variables["params"]
        steps = [(i, branch) for i in range(self.num_layers) for branch in self.branches]
        layer_rngs = [self._layer_rngs(i, deterministic) for i in range(self.num_layers)]
        functions = [functools.partial(_sublayer, self.config, branch, deterministic) for _, branch in steps]
        step_params = [{name: params[f"layer_{i}"][name] for name in (branch, f"{branch}_norm")} for i, branch in steps]
        a, b = reversible_sequence(functions, step_params, x, x, context, [layer_rngs[i] for i, _ in steps])
        return (a + b) / 2

    def _layer_rngs(self, index: int, deterministic: bool) -> dict:
        """Layer `index`'s rngs, drawn once and given to both the forward pass and its recomputation."""
        rngs = {}
        if not deterministic and self.has_rng("dropout"):
            rngs["dropout"] = self.make_rng("dropout")
        if self.config.attention == "lsh":
            rngs["lsh"] = self.make_rng("lsh") if self.has_rng("lsh") else jax.random.fold_in(
                fixed_rng(self.path), index)
        return rngs


def _sublayer(cfg, branch, deterministic, params, h, context, rngs):
    return Sublayers(cfg).apply({"params": params}, h, context, branch=branch, deterministic=deterministic, rngs=rngs)


# The arguments of EncoderLayer / DecoderLayer that a reversible stack reads, by parameter name.
_CONTEXT_ARGS = {"mask": "mask", "self_mask": "mask", "bias": "bias", "self_bias": "bias", "positions": "positions",
                 "encoded": "encoded", "cross_mask": "cross_mask"}


def reversible_layers(cfg: ModelConfig, layer_cls, num_layers: int, x, args, **layer_kwargs):
    """`models._apply_layers` for `cfg.reversible`: the sub-layers of `num_layers` `layer_cls` layers
    (`args` as their __call__ takes them after x) as a `ReversibleStack` named "reversible"."""
    names = list(inspect.signature(layer_cls.__call__).parameters)[2:]  # after self and x
    call = dict(zip(names, args))
    deterministic, decode = call.pop("deterministic"), call.pop("decode", False)
    decode_index = call.pop("decode_index", None)
    unknown = sorted(n for n, v in call.items() if n not in _CONTEXT_ARGS and v is not None)
    unknown += sorted(n for n, v in layer_kwargs.items() if n != "cross_attention")
    if unknown:
        raise ValueError(f"ModelConfig.reversible: the reversible stack does not support {layer_cls.__name__}'s "
                         f"{unknown}: use reversible=False.")
    context = {_CONTEXT_ARGS[n]: v for n, v in call.items() if n in _CONTEXT_ARGS}
    cross = "cross_mask" in call and layer_kwargs.get("cross_attention", True)
    branches = ("self_attention", "cross_attention", "feed_forward") if cross else ("self_attention", "feed_forward")
    stack = ReversibleStack(cfg, num_layers, branches, name="reversible")
    return stack(x, context, deterministic=deterministic, decode=decode, decode_index=decode_index)
