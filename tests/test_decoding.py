"""Greedy, beam search and sampling: on hand-set logits and against the model's full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from transformer import decoding

EOS = 1
# A Markov "model" whose next-token distribution depends on the previous token only.
# Tokens: 0 BOS/pad, 1 EOS, 2-4 a forced chain A1 -> A2 -> A3 -> EOS, 5 C -> EOS, 6 junk.
P_C, P_A = np.exp(-1.0), np.exp(-1.2)


def markov_table():
    probs = np.full((7, 7), 1e-12)
    probs[0, 5], probs[0, 2], probs[0, 6] = P_C, P_A, 1 - P_C - P_A
    probs[2, 3] = probs[3, 4] = probs[4, EOS] = probs[5, EOS] = 1.0
    probs[6, 6], probs[6, EOS] = 0.5, 0.5
    probs[1, 1] = 1.0
    return jnp.log(jnp.asarray(probs, jnp.float32))


def markov_logits_fn(tokens, cache):
    return markov_table()[tokens[:, 0]], cache


def test_beam_search_finds_the_known_best_and_length_penalty_changes_it():
    cache = {"unused": jnp.zeros(())}
    # Greedy takes C (0.37 > 0.30) and ends: "C EOS".
    greedy = decoding.greedy(markov_logits_fn, cache, 1, 6, EOS)
    np.testing.assert_array_equal(greedy[0], [5, EOS, 0, 0, 0, 0])
    # Without a length penalty "C EOS" (log p = -1.0) beats "A1 A2 A3 EOS" (-1.2).
    tokens, scores = decoding.beam_search(markov_logits_fn, cache, 1, 3, 6, EOS, alpha=0.0)
    np.testing.assert_array_equal(tokens[0, 0], [5, EOS, 0, 0, 0, 0])
    np.testing.assert_allclose(scores[0, 0], -1.0, rtol=1e-5)
    np.testing.assert_array_equal(tokens[0, 1], [2, 3, 4, EOS, 0, 0])
    # With alpha = 1 the longer sequence wins: -1.2 / (9/6) = -0.8 > -1.0 / (7/6) = -0.857.
    tokens, scores = decoding.beam_search(markov_logits_fn, cache, 1, 3, 6, EOS, alpha=1.0)
    np.testing.assert_array_equal(tokens[0, 0], [2, 3, 4, EOS, 0, 0])
    np.testing.assert_allclose(scores[0, 0], -1.2 / 1.5, rtol=1e-5)


def test_one_search_keeps_a_finished_set_per_length_penalty():
    cache = {"unused": jnp.zeros(())}
    tokens, scores = decoding.beam_search(markov_logits_fn, cache, 1, 3, 6, EOS, alpha=jnp.array([0.0, 1.0]))
    assert tokens.shape == (1, 2, 3, 6) and scores.shape == (1, 2, 3)
    np.testing.assert_array_equal(tokens[0, :, 0], [[5, EOS, 0, 0, 0, 0], [2, 3, 4, EOS, 0, 0]])  # as above
    for k, alpha in enumerate([0.0, 1.0]):
        alone_tokens, alone_scores = decoding.beam_search(markov_logits_fn, cache, 1, 3, 6, EOS, alpha=alpha)
        np.testing.assert_array_equal(tokens[:, k], alone_tokens)
        np.testing.assert_array_equal(scores[:, k], alone_scores)
    with pytest.raises(ValueError, match="scalar or a vector"):
        decoding.beam_search(markov_logits_fn, cache, 1, 3, 6, EOS, alpha=jnp.ones((2, 2)))


def test_finished_beams_are_never_extended():
    cache = {"unused": jnp.zeros(())}
    beam_size = 4
    tokens, scores = decoding.beam_search(markov_logits_fn, cache, 1, beam_size, 8, EOS, alpha=0.6)
    checked = 0
    for row, score in zip(np.asarray(tokens[0]), np.asarray(scores[0])):
        if score <= decoding.NEG_INF / 2:
            continue
        ends = np.flatnonzero(row == EOS)
        if ends.size:  # exactly one EOS, nothing after it
            assert ends.size == 1 and not row[ends[0] + 1:].any(), row
            checked += 1
    # Every beam finishes well within 8 tokens ("C EOS", "A1 A2 A3 EOS", "junk EOS", "junk junk EOS"),
    # so every row is a finished hypothesis and is checked: none may be skipped.
    assert checked == beam_size, (tokens, scores)


def test_top_p_and_top_k_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = decoding.filter_logits(logits, top_p=0.7) > decoding.NEG_INF
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = decoding.filter_logits(logits, top_k=3) > decoding.NEG_INF
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    # A vocabulary large enough for the chunked top-k: exactly the 20 largest logits of each row stay.
    logits = jnp.asarray(np.random.default_rng(0).permuted(np.tile(np.arange(6000.0), (3, 1)), axis=1), jnp.float32)
    kept = decoding.filter_logits(logits, top_k=20) > decoding.NEG_INF
    np.testing.assert_array_equal(kept, logits >= 6000 - 20)


@pytest.mark.parametrize("n, k, chunk, levels", [(4000, 10, 64, 1000), (1001, 4, 16, 5), (5000, 10, 8, 2)])
def test_chunked_top_k_equals_top_k_ties_included(n, k, chunk, levels):
    # Few distinct values (2 at the end: every top-k is ties only), N not a multiple of the chunk,
    # the largest values crowded into one chunk in some rows: values, indices and order must be top_k's.
    rng = np.random.default_rng(n)
    x = rng.integers(0, levels, (6, n)).astype(np.float32)
    x[0, 128:128 + k] = levels  # all of the top k in one chunk
    x[1, -1] = levels  # the largest in the last, partial chunk
    x[2] = decoding.NEG_INF
    x = jnp.asarray(x)
    values, indices = jax.jit(decoding.chunked_top_k, static_argnums=(1, 2))(x, k, chunk)
    expected_values, expected_indices = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)


# ---------------------------------------------------------------------------------------------
# On a real (randomly initialised) model.


@pytest.fixture(scope="module")
def translation_model():
    cfg = tfm.ModelConfig.preset("tiny", vocab_size=24, dropout_rate=0.0, num_encoder_layers=1, num_decoder_layers=1)
    model = tfm.EncoderDecoder(cfg)
    inputs = jnp.array([[5, 6, 7, 8, EOS, 0], [9, 10, 11, EOS, 0, 0]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    return model, params, inputs


def test_beam_size_one_equals_greedy(translation_model):
    model, params, inputs = translation_model
    translate = jax.jit(functools.partial(decoding.translate, model, eos_id=EOS, max_extra_length=6, alpha=0.0),
                        static_argnames="beam_size")
    np.testing.assert_array_equal(translate(params, inputs, beam_size=1), _beam_one(model, params, inputs))


def _beam_one(model, params, inputs):
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    max_length = inputs.shape[1] + 6
    cache = decoding.init_cache(model, params, max_length, 2, encoded, inputs)
    tokens, _ = decoding.beam_search(decoding.encoder_decoder_step_fn(model, params, encoded, inputs), cache, 2, 1,
                                     max_length, EOS, alpha=0.0)
    return tokens[:, 0]


def test_greedy_equals_argmax_of_full_forward(translation_model):
    model, params, inputs = translation_model
    tokens = decoding.translate(model, params, inputs, eos_id=EOS, beam_size=1, max_extra_length=2)
    logits = model.apply({"params": params}, inputs, tokens)
    # Each token is the argmax given the tokens before it (until EOS).
    for row in range(2):
        for t in range(tokens.shape[1]):
            if t and tokens[row, t - 1] == EOS:
                break
            assert tokens[row, t] == jnp.argmax(logits[row, t])


def test_cached_scores_equal_full_forward_scores(translation_model):
    model, params, inputs = translation_model
    targets = jnp.array([[3, 4, 5, EOS, 0], [6, 7, EOS, 0, 0]])
    full = jax.nn.log_softmax(model.apply({"params": params}, inputs, targets))
    full_scores = jnp.sum(jnp.take_along_axis(full, targets[..., None], -1)[..., 0] * (targets > 0), -1)
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    cache = decoding.init_cache(model, params, targets.shape[1], 2, encoded, inputs)
    step = decoding.encoder_decoder_step_fn(model, params, encoded, inputs)
    previous, cached_scores = jnp.zeros((2, 1), jnp.int32), jnp.zeros(2)
    for t in range(targets.shape[1]):
        logits, cache = step(previous, cache)
        cached_scores += jax.nn.log_softmax(logits)[jnp.arange(2), targets[:, t]] * (targets[:, t] > 0)
        previous = targets[:, t:t + 1]
    np.testing.assert_allclose(cached_scores, full_scores, rtol=1e-5)


@pytest.mark.parametrize("live_length", [0, 1, 17, 33, 37])
def test_reorder_beams_moves_the_live_positions_like_a_whole_cache_gather(live_length):
    # Cache length 37 = two 16-position blocks and a 5-position tail.
    rng = np.random.default_rng(live_length)
    cache = {"layer": {"cached_key": jnp.asarray(rng.normal(size=(2 * 3, 37, 2, 4)), jnp.float32),
                       "cached_value": jnp.asarray(rng.normal(size=(2 * 3, 37, 2, 4)), jnp.float32),
                       "static_key": jnp.asarray(rng.normal(size=(2 * 3, 9, 2, 4)), jnp.float32)},
             "index": jnp.array(live_length)}
    source_beam = jnp.array([[2, 2, 0], [1, 0, 1]])
    whole = decoding.reorder_beams(cache, source_beam)
    live = jax.jit(decoding.reorder_beams, static_argnames="block")(cache, source_beam, live_length, block=16)
    for name in ("cached_key", "cached_value"):
        np.testing.assert_array_equal(live["layer"][name][:, :live_length], whole["layer"][name][:, :live_length])
    expected_rows = np.array([2, 2, 0, 3 + 1, 3 + 0, 3 + 1])
    np.testing.assert_array_equal(whole["layer"]["cached_key"], cache["layer"]["cached_key"][expected_rows])
    np.testing.assert_array_equal(live["layer"]["static_key"], cache["layer"]["static_key"])  # not per beam
    assert int(live["index"]) == live_length


def test_beam_scores_equal_full_forward_scores_of_their_tokens(translation_model, monkeypatch):
    # 20 decoding positions: one whole reorder block of 16 and a tail. A random model rarely ends
    # early, so the beams are reordered at every position; a stale or misplaced key would make the
    # cached scores disagree with a full forward pass over the returned tokens.
    model, params, inputs = translation_model
    beam_size, max_extra = 3, 14
    translate = jax.jit(lambda p, x: _beams(model, p, x, beam_size, max_extra))
    tokens, scores = translate(params, inputs)
    assert tokens.shape == (2, beam_size, inputs.shape[1] + max_extra)
    checked = 0
    for row in range(2):
        for beam in range(beam_size):
            hyp = np.asarray(tokens[row, beam])
            logits = model.apply({"params": params}, inputs[row:row + 1], hyp[None])[0]
            full = jax.nn.log_softmax(logits.at[:, 0].set(decoding.NEG_INF))
            length = int(np.sum(hyp > 0))
            logprob = float(np.sum(np.take_along_axis(np.asarray(full), hyp[:, None], -1)[:length]))
            np.testing.assert_allclose(float(scores[row, beam]), logprob / decoding.length_penalty(length, 0.6),
                                       rtol=1e-4)
            checked += 1
    assert checked == 2 * beam_size
    # The same search with whole-cache reordering returns the same hypotheses.
    monkeypatch.setattr(decoding, "written_positions", lambda cache: None)
    whole_tokens, whole_scores = jax.jit(lambda p, x: _beams(model, p, x, beam_size, max_extra))(params, inputs)
    np.testing.assert_array_equal(whole_tokens, tokens)
    np.testing.assert_allclose(whole_scores, scores, rtol=1e-6)


def test_beams_sharing_their_rows_encoder_keys_equal_beams_with_copies(translation_model):
    # translate's way: one copy of the encoder's keys per row, the W beams attending as W queries;
    # before (and as usual): the encoder's output repeated for each beam. Same search, same result.
    model, params, inputs = translation_model
    search = jax.jit(lambda p, x, shared: _beams(model, p, x, 3, 10, shared), static_argnums=2)
    shared_tokens, shared_scores = search(params, inputs, True)
    copied_tokens, copied_scores = search(params, inputs, False)
    np.testing.assert_array_equal(shared_tokens, copied_tokens)
    np.testing.assert_allclose(shared_scores, copied_scores, rtol=1e-5)
    assert len(np.unique(np.asarray(shared_tokens[:, :, 0]))) > 1  # the beams differ: a real reordering


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=True, num_decoder_layers=2), dict(dtype="bfloat16")],
                         ids=["float32", "scanned_layers", "bfloat16"])
def test_beam_search_through_a_row_map_equals_moving_the_keys(overrides):
    # Beam search keeps each layer's keys where each beam wrote them and reorders a row map
    # (decoding.add_beam_rows); before (and as usual), the keys themselves moved at every step.
    # Scanned layers give the map a leading layer axis; bfloat16 keys are gathered as their bits.
    cfg = tfm.ModelConfig.preset("tiny", vocab_size=24, dropout_rate=0.0, num_encoder_layers=1,
                                 num_decoder_layers=overrides.pop("num_decoder_layers", 1), **overrides)
    model = tfm.EncoderDecoder(cfg)
    inputs = jnp.array([[5, 6, 7, 8, EOS, 0], [9, 10, 11, EOS, 0, 0]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    from experiments.benchmarks import decode as bench  # noqa: PLC0415

    mapped_tokens, mapped_scores = jax.jit(lambda p, x: _beams(model, p, x, 3, 14))(params, inputs)
    with bench.moved_keys():  # no row map: the keys move
        moved_tokens, moved_scores = jax.jit(lambda p, x: _beams(model, p, x, 3, 14))(params, inputs)
    np.testing.assert_array_equal(mapped_tokens, moved_tokens)
    np.testing.assert_array_equal(mapped_scores, moved_scores)
    assert len(np.unique(np.asarray(mapped_tokens[:, :, 0]))) > 1  # the beams differ: a real reordering


def test_a_decoding_step_reads_through_the_row_map_as_through_moved_keys():
    # One self-attention layer decoded step by step with random beam reorderings: its outputs, its
    # attention maps and its keys read through the map equal those of a cache whose keys move.
    b, w, length = 2, 3, 21  # a 16-key block and a tail
    module = tfm.attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b * w, length, 16)), jnp.float32)
    variables = module.init(jax.random.key(0), x, x, decode=True)
    params, moved = variables["params"], variables["cache"]
    mapped = decoding.add_beam_rows(moved, b, w)
    assert mapped["cached_rows"].shape == (b, w, length)
    for t in range(length):
        outs, maps = [], []
        for cache in (moved, mapped):
            out, mutated = module.apply({"params": params, "cache": cache}, x[:, t:t + 1], x[:, t:t + 1], decode=True,
                                        decode_index=t, mutable=["cache", "intermediates"])
            outs.append(out), maps.append(mutated["intermediates"]["attention_weights"][0][..., :t + 1])
            if cache is moved:
                moved = mutated["cache"]
            else:
                mapped = mutated["cache"]
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(maps[1], maps[0], rtol=1e-6, atol=1e-7)
        source_beam = jnp.asarray(rng.integers(0, w, size=(b, w)), jnp.int32)
        moved = decoding.reorder_beams(moved, source_beam, live_length=jnp.array(t + 1))
        written = mapped["cached_key"]
        mapped = decoding.reorder_beams(mapped, source_beam, live_length=jnp.array(t + 1))
        np.testing.assert_array_equal(mapped["cached_key"], written)  # only the map moves
        for name in ("cached_key", "cached_value"):
            np.testing.assert_array_equal(
                tfm.attention.beam_rows(mapped[name], mapped["cached_rows"])[:, :t + 1], moved[name][:, :t + 1])


@pytest.mark.parametrize("kv_length", [5, None])
@pytest.mark.parametrize("implementation", ["reference", "chunked", "fused", "splash"])
def test_attention_through_kv_rows_equals_attention_over_the_gathered_keys(kv_length, implementation):
    # The prefix kernel (kv_length) reads through the map block by block; every other path gathers
    # the keys and values first.
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(6, 1, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(6, 19, 2, 8)), jnp.float32) for _ in range(2))
    rows = jnp.asarray(rng.integers(0, 3, size=(2, 3, 19)), jnp.int32)
    attend = functools.partial(tfm.attention.dot_product_attention, implementation=implementation, kv_length=kv_length,
                               chunk_size=4)
    expected = attend(q, tfm.attention.beam_rows(k, rows), tfm.attention.beam_rows(v, rows))
    np.testing.assert_allclose(attend(q, k, v, kv_rows=rows), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(attend(q, k, v), expected)  # the map matters here
    with pytest.raises(ValueError, match="do not map"):
        tfm.attention.beam_rows(k, rows[:, :2])
    with pytest.raises(ValueError, match="batch_size x beam_size"):
        decoding.add_beam_rows({"cached_key": k, "cached_value": v}, 2, 2)


@pytest.mark.parametrize("penalty", ["gnmt", "power"])
def test_a_search_over_several_alphas_equals_a_search_per_alpha(translation_model, penalty):
    # The live beams do not depend on alpha; a finished set that can no longer improve stays as it is
    # while the search goes on for the other alphas, so each alpha's result is exactly its own search's.
    model, params, inputs = translation_model
    alphas = [0.0, 0.6, 1.5, 4.0]
    search = jax.jit(lambda p, x, alpha: _beams(model, p, x, 3, 10, alpha=alpha, penalty=penalty,
                                                     eos_bonus=3.0))  # endings of many lengths
    tokens, scores = search(params, inputs, jnp.array(alphas))
    assert tokens.shape == (2, 4, 3, 16) and scores.shape == (2, 4, 3)
    for k, alpha in enumerate(alphas):
        alone_tokens, alone_scores = search(params, inputs, jnp.float32(alpha))
        np.testing.assert_array_equal(tokens[:, k], alone_tokens)
        np.testing.assert_array_equal(scores[:, k], alone_scores)
    best = np.asarray(tokens[:, :, 0])
    assert any(not np.array_equal(best[:, 0], best[:, k]) for k in range(1, 4))  # the alphas chose differently


def test_translate_gives_one_output_per_alpha(translation_model):
    model, params, inputs = translation_model
    translate = jax.jit(functools.partial(decoding.translate, model, eos_id=EOS, max_extra_length=4),
                        static_argnames="beam_size")
    for beam_size in (1, 3):
        outputs = translate(params, inputs, beam_size=beam_size, alpha=jnp.array([0.0, 2.0]))
        assert outputs.shape == (2, 2, inputs.shape[1] + 4)
        for k, alpha in enumerate([0.0, 2.0]):
            np.testing.assert_array_equal(outputs[:, k], translate(params, inputs, beam_size=beam_size,
                                                                   alpha=jnp.float32(alpha)))


def test_decode_benchmarks_per_beam_baseline_translates_alike(translation_model, monkeypatch):
    from experiments.benchmarks import decode as bench  # noqa: PLC0415

    model, params, inputs = translation_model
    encoder_rows = []
    init_cache = decoding.init_cache
    monkeypatch.setattr(decoding, "init_cache",
                        lambda *args: encoder_rows.append(args[4].shape[0]) or init_cache(*args))

    def translate():
        return decoding.translate(model, params, inputs, eos_id=EOS, beam_size=3, max_extra_length=6)

    shared = translate()
    with bench.per_beam_encoder_keys():
        copied = translate()
    assert encoder_rows == [2, 2 * 3]  # the baseline repeats the encoder's output for each beam
    np.testing.assert_array_equal(shared, copied)


def test_decode_benchmarks_moved_keys_baseline_translates_alike(translation_model, monkeypatch):
    from experiments.benchmarks import decode as bench  # noqa: PLC0415

    model, params, inputs = translation_model
    with_map = []  # per reordering: did the cache carry a row map?
    reorder = decoding.reorder_beams

    def recording_reorder(cache, *args, **kwargs):
        paths = jax.tree_util.tree_flatten_with_path(cache)[0]
        with_map.append(any(getattr(path[-1], "key", None) == "cached_rows" for path, _ in paths))
        return reorder(cache, *args, **kwargs)

    monkeypatch.setattr(decoding, "reorder_beams", recording_reorder)

    def translate():
        return decoding.translate(model, params, inputs, eos_id=EOS, beam_size=3, max_extra_length=6)

    mapped = translate()
    with bench.moved_keys():
        moved = translate()
    assert with_map == [True, False]  # traced once each: the baseline moves the keys, ours the map
    np.testing.assert_array_equal(mapped, moved)


def test_decoding_step_attention_maps_of_shared_encoder_keys_are_per_beam(translation_model):
    model, params, inputs = translation_model
    beam_size, rows = 3, inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    tokens = jnp.arange(2, 2 + rows * beam_size)[:, None]  # a different token in each beam

    def maps(encoded, inputs):
        cache = decoding.init_cache(model, params, 4, rows * beam_size, encoded, inputs)
        logits, variables = model.apply({"params": params, "cache": cache}, encoded, inputs, tokens, decode=True,
                                        method=model.decode, mutable=["cache", "intermediates"])
        weights = [w for path, w in jax.tree_util.tree_flatten_with_path(variables["intermediates"])[0]
                   if "cross_attention" in jax.tree_util.keystr(path)]
        return logits, weights

    shared_logits, shared_maps = maps(encoded, inputs)
    copied_logits, copied_maps = maps(decoding.expand_beams(encoded, beam_size),
                                      decoding.expand_beams(inputs, beam_size))
    np.testing.assert_allclose(shared_logits, copied_logits, rtol=1e-5, atol=1e-6)
    assert len(shared_maps) == model.config.num_decoder_layers
    for shared, copied in zip(shared_maps, copied_maps):
        assert shared.shape == copied.shape == (rows * beam_size, model.config.num_heads, 1, inputs.shape[1])
        np.testing.assert_allclose(shared, copied, rtol=1e-5, atol=1e-7)


def test_beam_rows_must_be_whole_multiples_of_the_encoder_rows(translation_model):
    model, params, inputs = translation_model
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    with pytest.raises(ValueError, match="query rows must be the key rows or W beams"):
        decoding.init_cache(model, params, 4, 5, encoded, inputs)


def _beams(model, params, inputs, beam_size, max_extra, shared_encoder_keys=True, alpha=0.6, penalty="gnmt",
           eos_bonus=0.0):
    rows, max_length = inputs.shape[0], inputs.shape[1] + max_extra
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    if not shared_encoder_keys:
        encoded, inputs = decoding.expand_beams(encoded, beam_size), decoding.expand_beams(inputs, beam_size)
    cache = decoding.init_cache(model, params, max_length, rows * beam_size, encoded, inputs)
    step = decoding.encoder_decoder_step_fn(model, params, encoded, inputs)

    def no_pad_step(tokens, cache):  # a random model emits PAD; a trained one would not
        logits, cache = step(tokens, cache)
        return logits.at[:, 0].set(decoding.NEG_INF).at[:, EOS].add(eos_bonus), cache

    return decoding.beam_search(no_pad_step, cache, rows, beam_size, max_length, EOS, alpha, penalty)


@pytest.fixture(scope="module")
def language_model():
    cfg = tfm.ModelConfig.preset("tiny", vocab_size=24, dropout_rate=0.0, num_decoder_layers=1, position="rope")
    model = tfm.DecoderOnly(cfg)
    params = model.init(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
    return model, params


def _sample(model, params, prompt, **kwargs):
    cache = decoding.init_cache(model, params, 10, prompt.shape[0])
    return decoding.sample(decoding.decoder_only_step_fn(model, params), cache, prompt.shape[0], 10, EOS,
                           prompt=prompt, **kwargs)


def test_top_k_one_sampling_equals_greedy_and_seeds_repeat(language_model):
    model, params = language_model
    prompt = jnp.array([[5, 6, 0], [7, 8, 9]])
    greedy = _sample(model, params, prompt)
    np.testing.assert_array_equal(greedy[:, :2], prompt[:, :2])  # the prompt is kept
    np.testing.assert_array_equal(greedy[1, :3], prompt[1])
    top1 = _sample(model, params, prompt, rng=jax.random.key(0), top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    a = _sample(model, params, prompt, rng=jax.random.key(3), temperature=2.0)
    b = _sample(model, params, prompt, rng=jax.random.key(3), temperature=2.0)
    c = _sample(model, params, prompt, rng=jax.random.key(4), temperature=2.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_sharded_over_the_data_axis_matches_one_device(translation_model, beam_size):
    from transformer import sharding

    model, params, inputs = translation_model
    inputs = jnp.tile(inputs, (4, 1))  # 8 rows: one per simulated device
    translate = jax.jit(functools.partial(decoding.translate, model, eos_id=EOS, beam_size=beam_size,
                                          max_extra_length=4))
    expected = translate(params, inputs)
    mesh = sharding.make_mesh(data=8)
    sharded = translate(jax.device_put(params, sharding.replicated(mesh)),
                        jax.device_put(inputs, sharding.batch_sharding(mesh)))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(sharded, expected)
