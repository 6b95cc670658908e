"""Synthetic sequence tasks for tests and smoke runs: no files, no tokenizer, no TensorFlow.

Every batch is a pure function of (seed, step), so a resumed run needs only the step to continue
exactly, and `SyntheticIterator` checkpoints as `{"step": int}` like the real pipeline's iterators.

    it = SyntheticIterator(functools.partial(synthetic_batch, "reverse"), seed=0, batch_size=32,
                           length=16, vocab_size=32)
    batch = next(it)   # {"inputs": [B, L] int32, "targets": [B, L] int32}, 0 = pad, 1 = eos

Legend: B batch, L length (padded row length). Ids as in `transformer.data.tokenizer`: 0 pad,
1 eos; content tokens are drawn from [2, vocab_size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from transformer.tokens import EOS_ID, PAD_ID

FIRST_TOKEN = EOS_ID + 1  # synthetic text has no unknown pieces: content ids start right after EOS
TASKS = ("copy", "reverse", "sort")


def _rng(seed: int, step: int) -> np.random.Generator:
    # SeedSequence([seed, step]): independent streams per (seed, step), no sequential state.
    return np.random.default_rng([seed, step])


def _check_sizes(length: int, vocab_size: int) -> None:
    if length < 2 or vocab_size <= FIRST_TOKEN:
        raise ValueError(f"Need length >= 2 and vocab_size > {FIRST_TOKEN}, got {length} and {vocab_size}.")


def _eos_and_pad(content, lengths, length: int):
    """Rows of `content` [B, L] cut at `lengths` [B], then eos, then padding: [B, L] int32."""
    positions = np.arange(length)[None, :]
    tail = np.where(positions == lengths[:, None], EOS_ID, PAD_ID)
    return np.where(positions < lengths[:, None], content, tail).astype(np.int32)


def synthetic_batch(task: str, step: int, *, seed: int, batch_size: int, length: int,
                    vocab_size: int) -> dict[str, np.ndarray]:
    """A batch of a sequence-to-sequence task: targets are the inputs copied, reversed or sorted.

    Each row has a random number n in [1, length - 1] of tokens from [2, vocab_size), then eos,
    then padding; the target row holds the transformed n tokens, then eos, then padding.

    Returns:
      {"inputs": [B, L] int32, "targets": [B, L] int32}, a deterministic function of (seed, step).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {TASKS}.")
    _check_sizes(length, vocab_size)
    rng = _rng(seed, step)
    lengths = rng.integers(1, length, size=batch_size)  # [B], eos fits at index lengths <= L - 1
    tokens = rng.integers(FIRST_TOKEN, vocab_size, size=(batch_size, length))  # [B, L]
    positions = np.arange(length)[None, :]
    if task == "copy":
        transformed = tokens
    elif task == "reverse":
        # Position i of a row of n tokens takes token n - 1 - i (clipped indices land past the row, unused).
        transformed = np.take_along_axis(tokens, np.maximum(lengths[:, None] - 1 - positions, 0), axis=1)
    else:  # sort: push the positions past each row's end to the back with an id above every token
        transformed = np.sort(np.where(positions < lengths[:, None], tokens, vocab_size), axis=1)
    return {"inputs": _eos_and_pad(tokens, lengths, length),
            "targets": _eos_and_pad(transformed, lengths, length)}


# A sparse random bigram model: each token is followed by one of a few successors with these odds.
# Its entropy rate is ~0.8 nats/token against log(V - 2) for a uniform guess, so a model that learns
# it drives the loss well below uniform.
_SUCCESSOR_PROBS = (0.7, 0.2, 0.1)


@functools.lru_cache(maxsize=None)
def _bigram_successors(vocab_size: int) -> np.ndarray:
    """[vocab_size, len(_SUCCESSOR_PROBS)] int: the successors of each token.

    NOTE: fixed per vocab size and independent of the batch seed, so that train and eval streams
    (different seeds) sample the same language.
    """
    rng = np.random.default_rng(12345)
    num_tokens = vocab_size - FIRST_TOKEN
    k = min(len(_SUCCESSOR_PROBS), num_tokens)
    successors = np.stack([rng.permutation(num_tokens)[:k] for _ in range(vocab_size)]) + FIRST_TOKEN
    successors.setflags(write=False)
    return successors


def lm_batch(step: int, *, seed: int, batch_size: int, length: int, vocab_size: int) -> dict[str, np.ndarray]:
    """A batch of text from a fixed sparse bigram (Markov) model, for causal-LM and MLM smoke runs.

    Each row has a random number n in [length // 2, length - 1] of tokens (the first uniform over
    [2, vocab_size), each next one a successor of the previous), then eos, then padding.

    Returns:
      {"targets": [B, L] int32}, a deterministic function of (seed, step).
    """
    _check_sizes(length, vocab_size)
    successors = _bigram_successors(vocab_size)
    probs = np.asarray(_SUCCESSOR_PROBS[:successors.shape[1]])
    rng = _rng(seed, step)
    lengths = rng.integers(max(length // 2, 1), length, size=batch_size)  # [B]
    choices = rng.choice(len(probs), size=(batch_size, length), p=probs / probs.sum())  # [B, L]
    tokens = np.empty((batch_size, length), np.int64)
    tokens[:, 0] = rng.integers(FIRST_TOKEN, vocab_size, size=batch_size)
    for t in range(1, length):
        tokens[:, t] = successors[tokens[:, t - 1], choices[:, t]]
    return {"targets": _eos_and_pad(tokens, lengths, length)}


class SyntheticIterator:
    """Yields `fn(step=s, **kwargs)` for s = 0, 1, 2, ...; checkpointable as `{"step": s}`.

    The same interface as the real pipeline's iterators: `next(it)`, `get_state()`, `set_state()`.
    """

    def __init__(self, fn: Callable[..., dict[str, np.ndarray]], **kwargs: Any):
        self._fn, self._kwargs, self._step = fn, kwargs, 0

    def __iter__(self) -> SyntheticIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._fn(step=self._step, **self._kwargs)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """The step of the next batch: JSON-serialisable, saved with checkpoints."""
        return {"step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
