"""Synthetic tasks: determinism in (seed, step), exact targets, eos/padding layout, resumable iterators."""

import functools

import numpy as np
import pytest

from transformer.data import synthetic

SIZES = dict(batch_size=64, length=12, vocab_size=20)


def row_tokens(row):
    """The tokens before the eos of one row, checking the layout: tokens >= 2, one eos, then pads."""
    n = int(np.argmax(row == synthetic.EOS_ID))
    assert row[n] == synthetic.EOS_ID
    assert np.all(row[:n] >= 2) and np.all(row[n + 1:] == synthetic.PAD_ID)
    return row[:n]


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_same_seed_and_step_same_batch(task):
    batch = synthetic.synthetic_batch(task, 5, seed=3, **SIZES)
    np.testing.assert_equal(batch, synthetic.synthetic_batch(task, 5, seed=3, **SIZES))
    assert not np.array_equal(batch["inputs"], synthetic.synthetic_batch(task, 6, seed=3, **SIZES)["inputs"])
    assert not np.array_equal(batch["inputs"], synthetic.synthetic_batch(task, 5, seed=4, **SIZES)["inputs"])


@pytest.mark.parametrize("task,transform", [("copy", lambda x: x), ("reverse", lambda x: x[::-1]),
                                            ("sort", np.sort)])
def test_targets_are_the_transformed_inputs(task, transform):
    batch = synthetic.synthetic_batch(task, 0, seed=0, **SIZES)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == targets.shape == (64, 12) and inputs.dtype == targets.dtype == np.int32
    lengths = []
    for x, y in zip(inputs, targets):
        tokens = row_tokens(x)
        np.testing.assert_array_equal(row_tokens(y), transform(tokens))
        np.testing.assert_array_equal(y == synthetic.EOS_ID, x == synthetic.EOS_ID)  # eos at the same index
        lengths.append(len(tokens))
    assert min(lengths) >= 1 and max(lengths) <= 11 and len(set(lengths)) > 5  # variable lengths
    assert inputs.max() < 20


def test_reverse_and_sort_change_the_rows():
    batch = synthetic.synthetic_batch("reverse", 1, seed=0, **SIZES)
    assert not np.array_equal(batch["inputs"], batch["targets"])
    batch = synthetic.synthetic_batch("sort", 1, seed=0, **SIZES)
    assert not np.array_equal(batch["inputs"], batch["targets"])


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="copy"):
        synthetic.synthetic_batch("add", 0, seed=0, **SIZES)


def test_lm_batch_follows_a_sparse_bigram_model():
    targets = synthetic.lm_batch(0, seed=0, batch_size=256, length=32, vocab_size=32)["targets"]
    assert targets.shape == (256, 32) and targets.dtype == np.int32
    pairs = set()
    for row in targets:
        tokens = row_tokens(row)
        assert 16 <= len(tokens) <= 31
        pairs.update(zip(tokens[:-1].tolist(), tokens[1:].tolist()))
    # Each of the 30 tokens has at most 3 successors (uniform text would show ~all 900 pairs).
    assert 80 <= len(pairs) <= 30 * 3
    np.testing.assert_array_equal(targets, synthetic.lm_batch(0, seed=0, batch_size=256, length=32,
                                                              vocab_size=32)["targets"])
    other_seed = synthetic.lm_batch(0, seed=1, batch_size=256, length=32, vocab_size=32)["targets"]
    assert not np.array_equal(targets, other_seed)
    # Same language for every seed: the other stream's bigrams are the same successor sets.
    other_pairs = {p for row in other_seed for p in zip(row_tokens(row)[:-1].tolist(), row_tokens(row)[1:].tolist())}
    assert other_pairs <= set(zip(np.repeat(np.arange(32), 3).tolist(),
                                  synthetic._bigram_successors(32).reshape(-1).tolist()))


@pytest.mark.parametrize("fn", [functools.partial(synthetic.synthetic_batch, "sort"), synthetic.lm_batch])
def test_iterator_resumes_exactly(fn):
    kwargs = dict(seed=7, batch_size=4, length=10, vocab_size=16)
    uninterrupted = synthetic.SyntheticIterator(fn, **kwargs)
    batches = [next(uninterrupted) for _ in range(5)]
    interrupted = synthetic.SyntheticIterator(fn, **kwargs)
    for _ in range(3):
        next(interrupted)
    state = interrupted.get_state()
    assert state == {"step": 3}
    resumed = synthetic.SyntheticIterator(fn, **kwargs)
    resumed.set_state(state)
    np.testing.assert_equal(next(resumed), batches[3])
    np.testing.assert_equal(next(resumed), batches[4])
    assert resumed.get_state() == {"step": 5}
    assert not np.array_equal(batches[3]["targets"], batches[4]["targets"])
