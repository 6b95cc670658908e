"""Batching tokenised examples into fixed-shape int32 arrays: padding, length bucketing, packing.

An example is a dict of 1-D int32 token arrays ending in eos: `{"inputs": [Ti], "targets": [Tt]}`
for translation, `{"targets": [Tt]}` for language modelling. A batch is the same dict of [B, L]
arrays, 0 = padding. Three ways to build batches (all shapes from a small fixed set, so a jitted
train step compiles a handful of times at most):

  pad     every row padded to `max_length`: one shape [batch_size, max_length].
  bucket  the paper's batches by token budget (Section 5.1, ~25,000 source and target tokens): a
          window of examples is sorted by length and cut greedily into batches whose padded length L
          is a bucket boundary (multiples of 8, growing ~1.5x) and whose row count is
          `tokens_per_batch // L` (rounded down to `row_multiple`), so rows * L <= tokens_per_batch.
          Batches are shuffled within the window; a batch closed early (when the next, longer
          example needs a longer bucket) has empty rows: at most one per bucket length and window.
  pack    several examples per row of [batch_size, max_length], with `<feature>_segment_ids`
          (1, 2, ... per example, 0 on padding) and `<feature>_positions` (0, 1, ... restarting in
          each segment); grain's first-fit packing, see `transformer.data.pipeline`.

The bucketing iterator is checkpointable like every grain iterator: its state is the parent's
state at the start of the current window plus how many of the window's batches were emitted, so a
restored iterator rebuilds the window and continues with the next unseen batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

Example = dict[str, np.ndarray]  # feature -> [T] int32, eos-terminated
Batch = dict[str, np.ndarray]    # feature -> [B, L] int32, 0 = padding


def example_length(example: Example) -> int:
    """Longest feature of `example`: the length its row must hold."""
    return max(len(v) for v in example.values())


def fits(example: Example, max_length: int) -> bool:
    return example_length(example) <= max_length


def truncate(example: Example, max_length: int, eos_id: int) -> Example:
    """Cuts each feature to `max_length` tokens, keeping eos as the last one."""
    return {k: v if len(v) <= max_length else np.append(v[:max_length - 1], np.int32(eos_id)).astype(np.int32)
            for k, v in example.items()}


def pad_example(example: Example, length: int) -> Example:
    """Each [T] feature zero-padded to [length] (T <= length)."""
    return {k: np.pad(v, (0, length - len(v))) for k, v in example.items()}


def stack(examples: Sequence[Example], rows: int, length: int) -> Batch:
    """[rows, length] arrays holding `examples` (len <= rows); missing rows are all padding."""
    batch = {k: np.zeros((rows, length), np.int32) for k in examples[0]}
    for i, example in enumerate(examples):
        for k, v in example.items():
            batch[k][i, :len(v)] = v
    return batch


def bucket_boundaries(max_length: int, *, min_length: int = 8, growth: float = 1.5, multiple: int = 8) -> list[int]:
    """Padded lengths for bucketing: `min_length` growing by `growth`, rounded up to `multiple`, ending
    at `max_length` rounded up to `multiple`. E.g. max_length=256: 8 16 24 32 48 64 96 144 208 256."""
    top = multiple * math.ceil(max_length / multiple)
    boundaries, b = set(), float(min_length)
    while b < top:
        boundaries.add(min(top, multiple * math.ceil(b / multiple)))
        b *= growth
    boundaries.add(top)
    return sorted(boundaries)


def bucket_rows(length: int, tokens_per_batch: int, row_multiple: int) -> int:
    """Rows of a batch padded to `length`: the most that fit the token budget, a multiple of `row_multiple`."""
    return (tokens_per_batch // length) // row_multiple * row_multiple


def check_budget(boundaries: Sequence[int], tokens_per_batch: int, row_multiple: int) -> None:
    if bucket_rows(max(boundaries), tokens_per_batch, row_multiple) < row_multiple:
        raise ValueError(f"tokens_per_batch={tokens_per_batch} cannot hold {row_multiple} rows (row_multiple) of the "
                         f"longest bucket ({max(boundaries)} tokens): raise tokens_per_batch to at least "
                         f"{row_multiple * max(boundaries)} or lower max_length.")


def bucket_batches(examples: Sequence[Example], boundaries: Sequence[int], tokens_per_batch: int,
                   row_multiple: int = 1) -> list[Batch]:
    """Batches of `examples` sorted by length, each [rows(L), L] with L a boundary and rows(L)*L <= budget.

    Greedy over the sorted examples: a batch closes when one more example would need more rows than
    its (growing) bucket length allows. Every example lands in exactly one batch.
    """
    bucket_of = np.asarray(boundaries)
    lengths = np.array([example_length(e) for e in examples])
    padded = bucket_of[np.searchsorted(bucket_of, lengths)]  # smallest boundary >= length
    batches, current, current_len = [], [], 0
    for i in np.argsort(lengths, kind="stable"):
        rows = bucket_rows(padded[i], tokens_per_batch, row_multiple)
        if current and len(current) + 1 > rows:
            batches.append(stack(current, bucket_rows(current_len, tokens_per_batch, row_multiple), current_len))
            current = []
        current.append(examples[i])
        current_len = padded[i]
    if current:
        batches.append(stack(current, bucket_rows(current_len, tokens_per_batch, row_multiple), current_len))
    return batches


class BucketIterDataset(grain.IterDataset):
    """Token-budget batches from windows of `window_tokens` (padded) tokens of the parent's examples."""

    def __init__(self, parent: grain.IterDataset, *, boundaries: Sequence[int], tokens_per_batch: int,
                 row_multiple: int = 1, window_tokens: int | None = None, seed: int = 0, shuffle: bool = True):
        super().__init__(parent)
        check_budget(boundaries, tokens_per_batch, row_multiple)
        self.boundaries, self.tokens_per_batch, self.row_multiple = list(boundaries), tokens_per_batch, row_multiple
        # NOTE: the bigger the window, the fuller the buckets (less padding) but the more examples
        # a resumed run re-reads; 64 batches' worth costs well under a second.
        self.window_tokens = window_tokens or 64 * tokens_per_batch
        self.seed, self.shuffle = seed, shuffle

    def __iter__(self) -> grain.DatasetIterator:
        return _BucketIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BucketIterDataset(tokens_per_batch={self.tokens_per_batch}, boundaries={self.boundaries})"


class _BucketIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, config: BucketIterDataset):
        super().__init__(parent)
        self._config = config
        self._window_state = parent.get_state()  # parent's state where the current window starts
        self._window = 0                          # index of the current window (seeds its shuffle)
        self._batches: list[Batch] = []
        self._emitted = 0

    def __next__(self) -> Batch:
        while self._emitted == len(self._batches):
            if self._batches:  # move on to the next window
                self._window += 1
                self._window_state = self._parent.get_state()
            self._batches = self._read_window()
            self._emitted = 0
        self._emitted += 1
        return self._batches[self._emitted - 1]

    def _read_window(self) -> list[Batch]:
        """Reads examples from the parent until the window's padded tokens reach window_tokens."""
        examples, tokens = [], 0
        boundaries = np.asarray(self._config.boundaries)
        for example in self._parent:
            examples.append(example)
            tokens += int(boundaries[np.searchsorted(boundaries, example_length(example))])
            if tokens >= self._config.window_tokens:
                break
        if not examples:
            raise StopIteration
        batches = bucket_batches(examples, self._config.boundaries, self._config.tokens_per_batch,
                                 self._config.row_multiple)
        if self._config.shuffle:
            order = np.random.default_rng([self._config.seed, self._window]).permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._window_state, "window": self._window, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window_state, self._window = state["parent"], state["window"]
        self._batches, self._emitted = [], 0
        if state["emitted"]:
            self._batches = self._read_window()  # the same window again: same examples, same seed
            self._emitted = state["emitted"]

