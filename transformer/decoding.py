"""Decoding with the key/value cache inside `lax.while_loop`: greedy, beam search, sampling.

All decoders work on a `logits_fn(tokens [B', 1], cache) -> (logits [B', V], cache)` that runs one
cached decoder step; `encoder_decoder_step_fn` and `decoder_only_step_fn` build it for our models.
Sequences are [B, L] token ids without the BOS; PAD_ID (0) pads after EOS. The decoder starts from
PAD_ID, its BOS (see `transformer.tokens`).

Beam search follows Wu et al. (2016) and the paper (beam 4, length penalty alpha 0.6):
score = log P(y) / lp(y), lp(y) = ((5 + |y|) / 6) ** alpha. Finished hypotheses live in their own
set and are never extended; the search stops once no live beam can beat the finished ones.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from transformer.config import LENGTH_PENALTIES
from transformer.tokens import PAD_ID

NEG_INF = -1.0e7  # finite "impossible" log-probability: keeps arithmetic NaN-free


# ---------------------------------------------------------------------------------------------
# Caches and step functions for the models.


def init_cache(model, params, decoder_length: int, batch_size: int, *prefix):
    """An empty cache for `decoder_length` steps: runs `model.decode` once in cache-creating mode.

    `prefix`: the leading positional arguments of `model.decode` (EncoderDecoder: encoded, inputs).
    """
    dummy = jnp.zeros((batch_size, decoder_length), jnp.int32)
    _, variables = model.apply({"params": params}, *prefix, dummy, decode=True, method=model.decode,
                               mutable=["cache"])
    return variables["cache"]


def encoder_decoder_step_fn(model, params, encoded, inputs) -> Callable:
    """Cached decoder step of an EncoderDecoder given encoded [B', S, D] and inputs [B', S]."""

    def logits_fn(tokens, cache):
        logits, variables = model.apply({"params": params, "cache": cache}, encoded, inputs, tokens, decode=True,
                                        method=model.decode, mutable=["cache"])
        return logits[:, -1], variables["cache"]

    return logits_fn


def decoder_only_step_fn(model, params) -> Callable:
    def logits_fn(tokens, cache):
        logits, variables = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                        method=model.decode, mutable=["cache"])
        return logits[:, -1], variables["cache"]

    return logits_fn


REORDER_BLOCK = 16  # cache positions moved together when beams are reordered


def add_beam_rows(cache, batch_size: int, beam_size: int):
    """The cache with a row map beside each self-attention cache (`cached_rows`, int32 [..., B, W, S],
    each beam its own row at first; the leading axes of scanned layers kept): beam search then
    reorders the map, not the keys and values.

    Beam w of batch row b reads cached position s from beam `cached_rows[b, w, s]` of the same row
    (`attention.beam_rows`) and writes its new keys into its own cache row; other beams read them
    only once that beam is their ancestor. A reordering step then moves [B, W, S] int32 instead of
    every layer's keys and values written so far (~3x less time in a Multi30k self-attention step at
    beam 5 on CPU: docs/speed.md). A cache that is not a dict (a flax FrozenDict) is returned as it
    is, and its keys move as before.
    """
    def add(tree):
        if not isinstance(tree, dict):
            return tree
        tree = {name: add(sub) for name, sub in tree.items()}
        if "cached_key" in tree:
            *leading, rows, length = tree["cached_key"].shape[:-2]  # [..., B * W, S, K, H]
            if rows != batch_size * beam_size:
                raise ValueError(f"cache rows ({rows}) are not batch_size x beam_size = {batch_size} x {beam_size}.")
            tree["cached_rows"] = jnp.broadcast_to(jnp.arange(beam_size, dtype=jnp.int32)[:, None],
                                                   (*leading, batch_size, beam_size, length))
        return tree

    return add(cache)


def reorder_beams(cache, source_beam, live_length=None, block: int = REORDER_BLOCK):
    """Beam w of batch row b takes the cached keys/values of beam `source_beam[b, w]` of the same row.

    A layer's cache with a row map (`add_beam_rows`) has only its map reordered, [B, W, S]. Otherwise
    cached keys/values are [..., B * W, S, K, H] (beam-major within a row; 16-bit ones stored as
    bits by `MultiHeadAttention`, so they move in place on CPU too) and move; counters stay. The
    gather never crosses batch rows, so with the batch split over devices no cache moves between them.

    `live_length` (a traced scalar): only positions [0, live_length) hold keys yet, so only the
    `block`-position slices that cover them are moved, in place: a decoding step then costs time in
    proportion to the tokens so far, not to the cache length (about 4x less traffic per sentence
    at Multi30k's lengths, where the cache has room for the source length + 50).
    """
    b, w = source_beam.shape

    def take(x):  # [..., B * W, C, K, H] -> the same, beams reordered within each row
        axis = x.ndim - 4
        rows = x.reshape(*x.shape[:axis], b, w, *x.shape[axis + 1:])  # [..., B, W, C, K, H]
        # Mapped over B, each row's beams [..., W, C, K, H] keep the leading (scanned layer) axes first.
        taken = jax.vmap(lambda beams, source: jnp.take(beams, source, axis=axis, mode="clip"), in_axes=(axis, 0),
                         out_axes=axis)(rows, source_beam)
        return taken.reshape(x.shape)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache)
    names = [tuple(getattr(p, "key", None) for p in path) for path, _ in leaves]
    leaves = [leaf for _, leaf in leaves]
    mapped = {name[:-1] for name in names if name[-1] == "cached_rows"}  # layers whose keys stay where they are
    for i, name in enumerate(names):
        if name[-1] == "cached_rows":  # [..., B, W, S]
            source = source_beam.reshape((1,) * (leaves[i].ndim - 3) + (b, w, 1))
            leaves[i] = jnp.take_along_axis(leaves[i], source, axis=-2, mode="clip")
    moving = [i for i, name in enumerate(names) if name[-1] in ("cached_key", "cached_value")
              and name[:-1] not in mapped]
    if live_length is None:
        for i in moving:
            leaves[i] = take(leaves[i])
        return jax.tree_util.tree_unflatten(treedef, leaves)

    by_length = {}  # cache length -> indices of the leaves of that length (one loop per length)
    for i in moving:
        by_length.setdefault(leaves[i].shape[-3], []).append(i)
    for length, group in by_length.items():
        full_blocks, tail = divmod(length, block)

        def move_block(k, xs, size=block):
            start = k * size
            return tuple(jax.lax.dynamic_update_slice_in_dim(
                x, take(jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 3)), start, axis=x.ndim - 3)
                for x in xs)

        xs = tuple(leaves[i] for i in group)
        if full_blocks:
            live_blocks = jnp.minimum((live_length + block - 1) // block, full_blocks)
            xs = jax.lax.fori_loop(0, live_blocks, move_block, xs)
        if tail:  # positions past the last whole block
            start = full_blocks * block
            xs = jax.lax.cond(live_length > start, lambda xs: tuple(
                jax.lax.dynamic_update_slice_in_dim(x, take(jax.lax.slice_in_dim(x, start, length, axis=x.ndim - 3)),
                                                    start, axis=x.ndim - 3) for x in xs), lambda xs: xs, xs)
        for i, x in zip(group, xs):
            leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def written_positions(cache):
    """The number of positions the decoder has written into `cache` (its "index" counter), or None."""
    counters = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
                if getattr(path[-1], "key", None) == "index"]
    return counters[0] if counters else None


# ---------------------------------------------------------------------------------------------
# Greedy and sampling.


def greedy(logits_fn, cache, batch_size: int, max_length: int, eos_id: int):
    """Argmax decoding: [B, max_length] tokens, PAD_ID after each row's EOS."""
    return sample(logits_fn, cache, batch_size, max_length, eos_id, rng=None)


def sample(logits_fn, cache, batch_size: int, max_length: int, eos_id: int, *, rng=None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, prompt=None):
    """Ancestral sampling (argmax when `rng` is None), with temperature, top-k and nucleus (top-p).

    Args:
      prompt: optional [B, P] tokens (PAD_ID-padded on the right) to force before sampling starts.
    Returns:
      [B, max_length] tokens (the prompt included), PAD_ID after each row's EOS.
    """
    prompt = jnp.zeros((batch_size, 0), jnp.int32) if prompt is None else prompt
    prompt_lengths = jnp.sum(prompt != PAD_ID, axis=1)  # [B]
    prompt = jnp.pad(prompt, ((0, 0), (0, max_length - prompt.shape[1])), constant_values=PAD_ID)

    def body(state):
        step, tokens, done, cache = state
        previous = jnp.where(step == 0, PAD_ID, tokens[:, jnp.maximum(step - 1, 0)])  # [B]; BOS (PAD_ID) first
        logits, cache = logits_fn(previous[:, None], cache)  # [B, V]
        if rng is None:
            chosen = jnp.argmax(logits, axis=-1)
        else:
            chosen = jax.random.categorical(jax.random.fold_in(rng, step),
                                            filter_logits(logits / temperature, top_k, top_p))
        chosen = jnp.where(step < prompt_lengths, prompt[:, step], chosen)
        chosen = jnp.where(done, PAD_ID, chosen).astype(jnp.int32)
        tokens = tokens.at[:, step].set(chosen)
        done = done | ((chosen == eos_id) & (step >= prompt_lengths))
        return step + 1, tokens, done, cache

    def cond(state):
        step, _, done, _ = state
        return (step < max_length) & ~jnp.all(done)

    init = (jnp.array(0), jnp.full((batch_size, max_length), PAD_ID, jnp.int32), jnp.zeros((batch_size,), bool),
            cache)
    _, tokens, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Keeps the top-k logits and the smallest set whose probability reaches top_p; others -> NEG_INF."""
    if top_k:
        kth = chunked_top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the first whose cumulative mass reaches top_p).
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


# ---------------------------------------------------------------------------------------------
# Beam search.


def chunked_top_k(x, k: int, chunk: int = 64):
    """`jax.lax.top_k(x, k)` over the last axis, found in the k chunks of `chunk` entries with the largest maxima.

    x [..., N] -> (values [..., k], indices [..., k]): the same values, indices and order as
    `lax.top_k` (ties go to the lower index), N need not divide by `chunk`. The k largest entries lie
    in the k chunks with the largest maxima (a chunk outside them has k entries above its own
    maximum, each in a different chunk), so one vectorised max over x and two top-k's over k * chunk
    and N / chunk entries replace a top-k over all N. On CPU, XLA's top-k is a serial partial sort
    per row: over beam search's W * V candidates (40,000 at beam 5 and an 8k vocabulary) it took as
    long as the step's output projection. Sampling's top-k filter uses it too.
    """
    n = x.shape[-1]
    if n <= k * chunk * 2:  # nothing to gain
        return jax.lax.top_k(x, k)
    num_chunks = -(-n // chunk)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, num_chunks * chunk - n)], constant_values=-jnp.inf)
    chunks = padded.reshape(*x.shape[:-1], num_chunks, chunk)  # [..., C, chunk]
    _, best_chunks = jax.lax.top_k(jnp.max(chunks, axis=-1), k)  # [..., k]
    # In index order, so that the candidates keep their order in x and ties still go to the lower index.
    best_chunks = jnp.sort(best_chunks, axis=-1)
    candidates = jnp.take_along_axis(chunks, best_chunks[..., None], axis=-2)  # [..., k, chunk]
    values, picked = jax.lax.top_k(candidates.reshape(*x.shape[:-1], k * chunk), k)
    indices = jnp.take_along_axis(best_chunks, picked // chunk, axis=-1) * chunk + picked % chunk
    return values, indices


def length_penalty(length, alpha: float, form: str = "gnmt"):
    """"gnmt": Wu et al. (2016), ((5 + length) / 6) ** alpha; "power": length ** alpha (fairseq's and
    Hugging Face's `length_penalty`). `length` counts the output tokens, EOS included."""
    if form == "power":
        return jnp.asarray(length, jnp.float32) ** alpha
    if form != "gnmt":
        raise ValueError(f"length penalty form {form!r}: use one of {LENGTH_PENALTIES}.")
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(logits_fn, cache, batch_size: int, beam_size: int, max_length: int, eos_id: int,
                alpha=0.6, penalty: str = "gnmt"):
    """Beam search over a cache of [B * W, ...] rows (W = beam width; beam-major within a row) for the
    decoder's own keys and values; the encoder's cached keys may be one copy per row ([B, ...], as
    `translate` makes them) or per beam.

    Finished hypotheses are scored log P(y) / length_penalty(|y|, alpha, penalty). `alpha` is one
    length penalty, or A of them ([A]): the live beams never depend on alpha (it only ranks finished
    hypotheses), so one search keeps a finished set per alpha and runs until none of them can
    improve. Each alpha's result equals that of a search with that alpha alone (tested): choosing
    alpha on a development set costs one search, not A.

    Returns:
      (tokens [B, W, max_length], scores [B, W]) sorted best first, or [B, A, W, max_length] and
      [B, A, W] for A alphas; tokens end with EOS (unless cut at max_length) and are PAD_ID after it.
    """
    b, w = batch_size, beam_size
    alphas = jnp.asarray(alpha, jnp.float32)
    if alphas.ndim > 1:
        raise ValueError(f"alpha must be a scalar or a vector of length penalties, got shape {alphas.shape}.")
    alphas = alphas.reshape(-1)  # [A]
    a = alphas.shape[0]

    def flat(x):  # [B, W, ...] -> [B * W, ...]
        return x.reshape(b * w, *x.shape[2:])

    state = dict(
        step=jnp.array(0),
        live_tokens=jnp.full((b, w, max_length), PAD_ID, jnp.int32),
        # Only the first beam is live at the start, so the first expansion has no duplicates.
        live_logprobs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (w - 1)), (b, 1)),
        finished_tokens=jnp.full((b, a, w, max_length), PAD_ID, jnp.int32),
        finished_scores=jnp.full((b, a, w), NEG_INF),
        cache=add_beam_rows(cache, b, w),
    )

    def body(state):
        step = state["step"]
        # [B, W]: the last token of each beam, BOS (PAD_ID) at the first step.
        previous = jnp.where(step == 0, PAD_ID, state["live_tokens"][:, :, jnp.maximum(step - 1, 0)])
        logits, cache = logits_fn(flat(previous)[:, None], state["cache"])
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, w, -1)  # [B, W, V]
        vocab = logprobs.shape[-1]
        candidates = (state["live_logprobs"][..., None] + logprobs).reshape(b, w * vocab)
        # 2W candidates: even if W of them end in EOS, W live ones remain.
        top_logprobs, top_index = chunked_top_k(candidates, 2 * w)  # [B, 2W]
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_tokens = jnp.take_along_axis(state["live_tokens"], top_beam[..., None], axis=1)  # [B, 2W, L]
        top_tokens = top_tokens.at[:, :, step].set(top_token)
        is_eos = top_token == eos_id

        # Live set: the best W candidates not ending in EOS.
        live_logprobs, live_pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logprobs), w)
        live_tokens = jnp.take_along_axis(top_tokens, live_pick[..., None], axis=1)
        source_beam = jnp.take_along_axis(top_beam, live_pick, axis=1)  # [B, W]
        cache = reorder_beams(cache, source_beam, live_length=written_positions(cache))

        # Finished sets, one per alpha: merge the old with candidates that just ended (or hit max length).
        at_end = step == max_length - 1
        ends = (is_eos | at_end)[:, None, :]  # [B, 1, 2W]
        penalties = length_penalty(step + 1, alphas, penalty)[None, :, None]  # [1, A, 1]
        new_scores = jnp.where(ends, top_logprobs[:, None, :] / penalties, NEG_INF)  # [B, A, 2W]
        scores = jnp.concatenate([state["finished_scores"], new_scores], axis=-1)  # [B, A, 3W]
        finished_scores, finished_pick = jax.lax.top_k(scores, w)  # [B, A, W]
        candidate_tokens = jnp.broadcast_to(top_tokens[:, None], (b, a, 2 * w, max_length))
        tokens = jnp.concatenate([state["finished_tokens"], candidate_tokens], axis=2)  # [B, A, 3W, L]
        finished_tokens = jnp.take_along_axis(tokens, finished_pick[..., None], axis=2)
        return dict(step=step + 1, live_tokens=live_tokens, live_logprobs=live_logprobs,
                    finished_tokens=finished_tokens, finished_scores=finished_scores, cache=cache)

    def cond(state):
        # Log-probabilities only fall as sequences grow, and the penalty (alpha >= 0) is largest at
        # max_length: that bounds what any live beam can still reach, under each alpha.
        best_possible = state["live_logprobs"][:, :1] / length_penalty(max_length, alphas, penalty)  # [B, A]
        worst_finished = state["finished_scores"][:, :, -1]
        can_improve = jnp.any(best_possible > worst_finished)
        return (state["step"] < max_length) & can_improve

    state = jax.lax.while_loop(cond, body, state)
    tokens, scores = state["finished_tokens"], state["finished_scores"]
    if jnp.ndim(alpha) == 0:
        return tokens[:, 0], scores[:, 0]
    return tokens, scores


def expand_beams(x, beam_size: int):
    """[B, ...] -> [B * W, ...], each row repeated W = beam_size times (beam-major within a row)."""
    return jnp.repeat(x, beam_size, axis=0)


# ---------------------------------------------------------------------------------------------
# Model-level entry points.


def translate(model, params, inputs, *, eos_id: int, beam_size: int = 4, alpha: float = 0.6,
              max_extra_length: int = 50, penalty: str = "gnmt"):
    """EncoderDecoder inputs [B, S] -> best outputs [B, S + max_extra_length] (greedy when beam_size == 1).

    With A length penalties (`alpha` [A]), one search gives the best output under each: [B, A, S +
    max_extra_length] (greedy decoding has no penalty: the same output A times)."""
    batch = inputs.shape[0]
    max_length = inputs.shape[1] + max_extra_length
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    # The encoder's keys and values stay one copy per row: with beams, the decoder's B * W rows attend
    # to them as W queries of their row (MultiHeadAttention folds them), not W repeated copies.
    cache = init_cache(model, params, max_length, batch * beam_size, encoded, inputs)
    step = encoder_decoder_step_fn(model, params, encoded, inputs)
    if beam_size == 1:
        tokens = greedy(step, cache, batch, max_length, eos_id)
        if jnp.ndim(alpha) == 0:
            return tokens
        return jnp.broadcast_to(tokens[:, None], (batch, jnp.shape(alpha)[0], max_length))
    tokens, _ = beam_search(step, cache, batch, beam_size, max_length, eos_id, alpha, penalty)
    return tokens[..., 0, :]  # the best of each row's (and alpha's) finished set
