"""Pure batching functions: bucket boundaries, token-budget bucketing, truncation."""

import collections

import numpy as np
import pytest

from transformer.data import batching


def random_examples(n: int, max_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(2, 100, rng.integers(1, max_len + 1)).astype(np.int32),
             "targets": rng.integers(2, 100, rng.integers(1, max_len + 1)).astype(np.int32)} for _ in range(n)]


def rows_of(batch) -> list[tuple]:
    """(inputs, targets) without padding, one per non-empty row."""
    return [(tuple(i[i > 0]), tuple(t[t > 0])) for i, t in zip(batch["inputs"], batch["targets"]) if t.any()]


def test_bucket_boundaries_are_few_multiples_of_eight():
    assert batching.bucket_boundaries(256) == [8, 16, 24, 32, 48, 64, 96, 144, 208, 256]
    for max_length in (8, 50, 100, 1024):
        b = batching.bucket_boundaries(max_length)
        assert b == sorted(set(b)) and all(x % 8 == 0 for x in b) and b[-1] >= max_length and len(b) <= 16


@pytest.mark.parametrize("tokens_per_batch, row_multiple", [(512, 1), (1000, 8), (4096, 8)])
def test_bucket_batches_respect_budget_and_keep_every_example_once(tokens_per_batch, row_multiple):
    examples = random_examples(500, 60)
    boundaries = batching.bucket_boundaries(64)
    batches = batching.bucket_batches(examples, boundaries, tokens_per_batch, row_multiple)
    for b in batches:
        rows, length = b["inputs"].shape
        assert b["targets"].shape == (rows, length) and b["inputs"].dtype == np.int32
        assert length in boundaries and rows % row_multiple == 0 and rows * length <= tokens_per_batch
    got = collections.Counter(r for b in batches for r in rows_of(b))
    assert got == collections.Counter((tuple(e["inputs"]), tuple(e["targets"])) for e in examples)
    # Greedy over sorted lengths: at most one partly filled batch per bucket length.
    partial = [b["inputs"].shape[1] for b in batches if not b["targets"][-1].any()]
    assert len(partial) == len(set(partial))


def test_budget_too_small_for_longest_bucket_is_an_error():
    with pytest.raises(ValueError, match="tokens_per_batch=100 cannot hold 8 rows"):
        batching.check_budget([8, 16, 64], 100, 8)


def test_truncate_keeps_eos_last():
    example = {"inputs": np.arange(3, 13, dtype=np.int32), "targets": np.array([5, 6, 1], np.int32)}
    cut = batching.truncate(example, 4, eos_id=1)
    np.testing.assert_array_equal(cut["inputs"], [3, 4, 5, 1])
    np.testing.assert_array_equal(cut["targets"], [5, 6, 1])
    assert cut["inputs"].dtype == np.int32
    assert not batching.fits(example, 9) and batching.fits(example, 10)
