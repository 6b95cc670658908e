"""Subword regularization: n-best segmentations, Kudo's draw probabilities, a deterministic and resumable draw."""

import collections
import itertools
import json

import numpy as np
import pytest

from transformer import data
from transformer.data import subwords

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def examples(train_examples):
    return train_examples(600)


@pytest.fixture(scope="module")
def tok(examples):
    return data.train_tokenizer(data.translation_texts(examples), 500)


def test_nbest_starts_with_the_best_segmentation_and_each_spells_the_text(tok, examples):
    text = examples[3]["target"]
    candidates, log_probs = tok.nbest(text, 8)
    assert len(candidates) == len(log_probs) == 8 and len(set(map(tuple, candidates))) == 8
    assert candidates[0] == tok.encode(text)
    assert np.all(np.diff(log_probs) <= 1e-9)  # most likely first
    assert {tok.decode(c) for c in candidates} == {text}
    assert tok.nbest("", 4)[0] == [[]]


def test_nbest_needs_a_unigram_model(examples):
    bpe = data.train_tokenizer(data.translation_texts(examples), 300, model_type="bpe")
    assert bpe.model_type == "bpe"
    with pytest.raises(ValueError, match="needs a unigram vocabulary.*config.data.tokenizer='unigram'"):
        bpe.nbest("A dog.", 4)


def test_draw_probabilities_are_p_to_the_alpha_normalised():
    log_probs = np.log([0.5, 0.3, 0.2])
    np.testing.assert_allclose(subwords.draw_probabilities(log_probs, 1.0), [0.5, 0.3, 0.2])
    p = np.array([0.5, 0.3, 0.2]) ** 0.1
    np.testing.assert_allclose(subwords.draw_probabilities(log_probs, 0.1), p / p.sum())
    assert subwords.draw_probabilities(log_probs, 50.0)[0] > 0.999999  # a large alpha keeps to the best
    np.testing.assert_allclose(subwords.draw_probabilities(np.array([-400.0, -900.0]), 1e-3).sum(), 1.0)


def test_draw_picks_the_candidate_whose_interval_holds_u(tok):
    seg = subwords.segmentations(tok, "A man in a blue shirt.", eos_id=tok.eos_id, n=4, alpha=0.5)
    candidates, log_probs = tok.nbest("A man in a blue shirt.", 4)
    p = subwords.draw_probabilities(log_probs, 0.5)
    assert len(seg) == 4 and seg.cdf[-1] == 1.0
    for k, u in enumerate(np.cumsum(p) - p / 2):  # the middle of each candidate's interval
        np.testing.assert_array_equal(subwords.draw(seg, u), candidates[k] + [tok.eos_id])
    assert subwords.draw(seg, 0.0).tolist() == candidates[0] + [tok.eos_id]
    with pytest.raises(ValueError, match="alpha=0 must be positive"):
        subwords.segmentations(tok, "A dog.", eos_id=1, n=4, alpha=0)


def test_uniform_is_a_pure_function_spread_over_the_unit_interval():
    us = np.array([subwords.uniform(0, i, 0) for i in range(20_000)])
    assert us.min() >= 0 and us.max() < 1
    counts, _ = np.histogram(us, bins=10, range=(0, 1))
    assert counts.min() > 1800 and counts.max() < 2200  # ~2,000 each
    assert subwords.uniform(0, 7, 1) == subwords.uniform(0, 7, 1)
    assert len({subwords.uniform(s, i, j) for s in range(3) for i in range(3) for j in range(2)}) == 18


def normal(tok, text):
    """`text` as decoding gives it back (SentencePiece normalises: runs of spaces become one)."""
    return tok.decode(tok.encode(text))


def sampled(examples, tok, **kwargs):
    kwargs = {"max_length": MAX_LENGTH, "seed": 0, "batch_size": 8, "subword_samples": 8, "subword_alpha": 0.1,
              **kwargs}
    return data.translation_batches(examples, tok, batching="pack", **kwargs)


def segment_pairs(batch):
    def segments(key):
        tokens, ids = batch[key], batch[f"{key}_segment_ids"]
        return [tuple(row[row_ids == s]) for row, row_ids in zip(tokens, ids) for s in range(1, row_ids.max() + 1)]
    return list(zip(segments("inputs"), segments("targets")))


def test_each_read_is_a_segmentation_of_its_sentence_drawn_at_kudos_rate(examples, tok):
    by_text = {(normal(tok, e["source"]), normal(tok, e["target"])) for e in examples}
    reads = collections.defaultdict(list)  # target text -> the target ids of each read
    for batch in itertools.islice(sampled(examples, tok), 600):  # ~8 epochs
        for source, target in segment_pairs(batch):
            texts = (tok.decode(source), tok.decode(target))
            assert texts in by_text and source[-1] == target[-1] == tok.eos_id
            reads[texts[1]].append(target)
    # The best segmentation is read about as often as Kudo's formula says, and others are read too.
    expected = observed = 0.0
    for text, ids in reads.items():
        candidates, log_probs = tok.nbest(text, 8)
        expected += subwords.draw_probabilities(log_probs, 0.1)[0] * len(ids)
        observed += sum(i == tuple(candidates[0]) + (tok.eos_id,) for i in ids)
    total = sum(map(len, reads.values()))
    assert total > 3000 and abs(observed - expected) < 4 * np.sqrt(expected) + 1
    assert sum(len(set(ids)) > 1 for ids in reads.values()) > len(reads) / 2


def test_without_sampling_every_read_is_the_best_segmentation(examples, tok):
    for batch in itertools.islice(sampled(examples, tok, subword_samples=0), 20):
        for source, target in segment_pairs(batch):
            assert list(target[:-1]) == tok.encode(tok.decode(target))


def test_draws_are_fixed_by_the_seed_and_survive_a_resume(examples, tok):
    def first(seed, n=12):
        return list(itertools.islice(sampled(examples, tok, seed=seed), n))

    a, b, c = first(0), first(0), first(1)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["targets"], z["targets"]) for x, z in zip(a, c))
    it = sampled(examples, tok)
    list(itertools.islice(it, 90))  # past the first epoch (~75 batches)
    state = json.loads(json.dumps(it.get_state()))
    uninterrupted = list(itertools.islice(it, 6))
    resumed = sampled(examples, tok)
    resumed.set_state(state)
    for x, y in zip(itertools.islice(resumed, 6), uninterrupted):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_lm_batches_draw_segmentations_too(examples, tok):
    texts = [e["target"] for e in examples]
    it = data.lm_batches(texts, tok, batching="pack", batch_size=4, max_length=MAX_LENGTH, subword_samples=8,
                         subword_alpha=0.1)
    reads = [tuple(row[ids == s]) for b in itertools.islice(it, 40)
             for row, ids in zip(b["targets"], b["targets_segment_ids"]) for s in range(1, ids.max() + 1)]
    assert {tok.decode(r) for r in reads} <= {normal(tok, t) for t in texts}
    assert sum(list(r[:-1]) != tok.encode(tok.decode(r)) for r in reads) > len(reads) / 4
