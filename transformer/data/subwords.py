"""Subword regularization (Kudo, 2018): each time a training sentence is read, one of its likely
segmentations is drawn, so the model sees the same text cut into pieces in different ways.

Kudo's l-best sampling (Section 3.2): a unigram vocabulary gives every segmentation x of a
sentence X a probability P(x) = prod_i p(x_i); of the `n` most likely,

    P(draw x_k) = P(x_k) ** alpha / sum_j P(x_j) ** alpha        (k = 1 .. n)

so alpha -> 0 draws uniformly among the n, and a large alpha keeps to the best one. The paper's
setting: n = 64, alpha = 0.1.

The n best are found once per sentence (`segmentations`, ~15 s for Multi30k's 58k sentences at
n = 64); which one a read gets is a pure function of (seed, the read's index in the repeated,
shuffled stream, the feature), so the batches of a run are fixed by its seed and a resumed
iterator reads exactly what an uninterrupted one would.

    seg = segmentations(tok, "A dog runs.", eos_id=1, n=64, alpha=0.1)
    draw(seg, 0.3) -> int32 [T] ids, eos-terminated
"""

from __future__ import annotations

import dataclasses

import numpy as np

_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Segmentations:
    """A sentence's candidate segmentations (each eos-terminated) and the cumulative probability of drawing each."""

    ids: np.ndarray  # int32 [sum of the candidates' lengths]: candidate k is ids[starts[k]:starts[k + 1]]
    starts: np.ndarray  # int64 [n + 1]
    cdf: np.ndarray  # float64 [n]: P(draw candidate <= k); cdf[-1] = 1

    def __len__(self) -> int:
        return len(self.cdf)


def draw_probabilities(log_probs: np.ndarray, alpha: float) -> np.ndarray:
    """[n] P(x_k) ** alpha, normalised, from the candidates' [n] log-probabilities."""
    logits = alpha * (np.asarray(log_probs, np.float64) - np.max(log_probs))
    weights = np.exp(logits)
    return weights / weights.sum()


def segmentations(tok, text: str, *, eos_id: int, n: int, alpha: float) -> Segmentations:
    """The `n` best segmentations of `text` under `tok` (a unigram model: `Tokenizer.nbest`), eos appended."""
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} must be positive (P(x) ** alpha; alpha -> 0 draws uniformly).")
    candidates, log_probs = tok.nbest(text, n)
    cdf = np.cumsum(draw_probabilities(log_probs, alpha))
    cdf[-1] = 1.0
    lengths = np.array([len(c) + 1 for c in candidates], np.int64)
    ids = np.fromiter((i for c in candidates for i in (*c, eos_id)), np.int32, count=int(lengths.sum()))
    return Segmentations(ids, np.concatenate([[0], np.cumsum(lengths)]), cdf)


def draw(seg: Segmentations, u: float) -> np.ndarray:
    """The candidate whose cumulative-probability interval holds `u` in [0, 1): int32 [T]."""
    k = min(int(np.searchsorted(seg.cdf, u, side="right")), len(seg) - 1)
    return seg.ids[seg.starts[k]:seg.starts[k + 1]]


def uniform(seed: int, index: int, stream: int) -> float:
    """A number in [0, 1) that is a pure function of its arguments (SplitMix64 of their mix)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 1) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def sample_example(index: int, example: dict, *, seed: int) -> dict:
    """`example` with each `Segmentations` feature replaced by one draw for read number `index`."""
    return {k: draw(v, uniform(seed, index, j)) if isinstance(v, Segmentations) else v
            for j, (k, v) in enumerate(sorted(example.items()))}
