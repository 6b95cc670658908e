"""Translating text in batches and scoring it: sacreBLEU on detokenised output, perplexity.

`Translator` turns sentences into translations with a trained EncoderDecoder: it sorts sentences by
length, pads each batch to a multiple of 8 tokens and a fixed row count (so only a handful of
shapes ever compile), decodes with beam search or greedily, and restores the input order.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from absl import logging

from transformer import decoding

LENGTH_MULTIPLE = 8  # inputs are padded to a multiple of this: few distinct shapes, few compiles


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], *, lowercase: bool = False):
    """sacreBLEU's corpus score of detokenised text against one reference each: (BLEUScore, signature).
    The score has `.score`, and `.ratio`: hypothesis / reference tokens (13a), which the brevity penalty compares."""
    metric = sacrebleu.metrics.BLEU(lowercase=lowercase)
    return metric.corpus_score(list(hypotheses), [list(references)]), str(metric.get_signature())


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, lowercase: bool = False) -> tuple[float, str]:
    """Corpus sacreBLEU of detokenised text against one reference each: (score, signature)."""
    score, signature = corpus_bleu(hypotheses, references, lowercase=lowercase)
    return score.score, signature


class Translator:
    """Batched translation with a trained model; `tokenizer` has encode(str) -> ids, decode(ids) -> str."""

    def __init__(self, model, tokenizer, *, beam_size: int = 4, alpha: float = 0.6, batch_size: int = 64,
                 max_input_length: int = 256, max_extra_length: int = 50, length_penalty: str = "gnmt",
                 sharding=None):
        self.model, self.tokenizer = model, tokenizer
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        # Rows are split over the devices of the batch axes: round up to a multiple of their number.
        multiple = batch_shards(sharding)
        self.batch_size = -(-batch_size // multiple) * multiple
        if self.batch_size != batch_size:
            logging.info("Decoding batches of %d rows (a multiple of the %d batch shards), not %d.", self.batch_size,
                         multiple, batch_size)
        self.max_input_length = max_input_length
        self.sharding = sharding
        self.beam_size, self.alpha = beam_size, alpha
        # alpha is an argument of the compiled search, not a constant in it: decoding with another length
        # penalty (a search on val) reuses each input length's compiled program.
        self._translate = jax.jit(functools.partial(
            decoding.translate, model, eos_id=tokenizer.eos_id, beam_size=beam_size,
            max_extra_length=max_extra_length, penalty=length_penalty))

    @classmethod
    def from_config(cls, model, tokenizer, decode, *, max_input_length: int, sharding=None,
                    **overrides) -> "Translator":
        """A Translator with a run's `DecodeConfig` (beam_size, alpha, batch_size); `overrides` replace any of them."""
        settings = dict(beam_size=decode.beam_size, alpha=decode.alpha, length_penalty=decode.length_penalty,
                        batch_size=decode.batch_size)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model, tokenizer, max_input_length=max_input_length, sharding=sharding, **settings)

    def encode(self, sentence: str) -> list[int]:
        ids = self.tokenizer.encode(sentence)
        if len(ids) + 1 > self.max_input_length:
            logging.warning("Input of %d tokens truncated to %d: %.60s...", len(ids) + 1, self.max_input_length,
                            sentence)
            ids = ids[: self.max_input_length - 1]
        return ids + [self.tokenizer.eos_id]

    def __call__(self, params, sentences: Sequence[str], alpha: float | None = None) -> list[str]:
        """Translations of `sentences`, in order, with length penalty `alpha` (None: this translator's);
        an empty (or blank) sentence translates to ''."""
        return self._translate_all(params, sentences, jnp.float32(self.alpha if alpha is None else alpha))[0]

    def with_alphas(self, params, sentences: Sequence[str], alphas: Sequence[float]) -> dict[float, list[str]]:
        """{alpha: translations of `sentences`} for each length penalty in `alphas`, from one beam search
        per batch (`decoding.beam_search` keeps a finished set per alpha): the same translations as
        `self(params, sentences, alpha)` for each alpha, at about the cost of one."""
        alphas = [float(a) for a in alphas]
        if not alphas:
            raise ValueError("with_alphas needs at least one length penalty.")
        outputs = self._translate_all(params, sentences, jnp.asarray(alphas, jnp.float32))
        return dict(zip(alphas, outputs))

    def padded_rows(self, rows: int) -> int:
        """The rows of a batch holding `rows` sentences: `batch_size` when full; a short batch (the last of
        a call, or a call with few sentences) is padded only to the next power of two, at least the batch
        shards' number and a multiple of it, since every row costs as much as a sentence in the search.
        At most log2(batch_size) more programs per length bucket."""
        multiple = batch_shards(self.sharding)
        padded = max(1 << (rows - 1).bit_length(), multiple)
        return min(-(-padded // multiple) * multiple, self.batch_size)

    def _translate_all(self, params, sentences: Sequence[str], alpha) -> list[list[str]]:
        """One list of translations per length penalty in `alpha` (a scalar: one list)."""
        encoded = [self.encode(s) if s.strip() else None for s in sentences]
        order = sorted((i for i, ids in enumerate(encoded) if ids is not None), key=lambda i: len(encoded[i]))
        outputs = [[""] * len(sentences) for _ in range(max(1, alpha.size))]
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            length = -(-max(len(encoded[i]) for i in rows) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
            batch = np.zeros((self.padded_rows(len(rows)), length), np.int32)
            for r, i in enumerate(rows):
                batch[r, :len(encoded[i])] = encoded[i]
            batch[len(rows):, 0] = self.tokenizer.eos_id  # filler rows: an empty sentence
            inputs = jnp.asarray(batch) if self.sharding is None else jax.device_put(batch, self.sharding)
            tokens = np.asarray(jax.device_get(self._translate(params, inputs, alpha=alpha)))
            tokens = tokens.reshape(len(batch), len(outputs), -1)  # [B, A, L]
            for r, i in enumerate(rows):
                for k, output in enumerate(outputs):
                    output[i] = self.tokenizer.decode(tokens[r, k].tolist())
        return outputs


def batch_shards(sharding) -> int:
    """How many ways `sharding` splits a batch's rows (1 without a NamedSharding)."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or not len(sharding.spec) or sharding.spec[0] is None:
        return 1
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return math.prod(sharding.mesh.shape[axis] for axis in axes)


def score_translations(hypotheses: Sequence[str], references: Sequence[str], seconds: float) -> dict:
    """Cased and lowercased sacreBLEU of `hypotheses`, their throughput (decoded in `seconds`), and
    `length_ratio`: hypothesis / reference length in the lowercased score's tokens, which its brevity
    penalty compares (below 1 the penalty applies; the length penalty alpha moves it)."""
    cased, signature = bleu(hypotheses, references)
    lowercased, lc_signature = corpus_bleu(hypotheses, references, lowercase=True)
    return dict(bleu=cased, bleu_lc=lowercased.score, signature=signature, signature_lc=lc_signature,
                length_ratio=lowercased.ratio,
                sentences_per_s=len(hypotheses) / seconds, hypotheses=hypotheses)


def evaluate_translations(translator: Translator, params, sources: Sequence[str], references: Sequence[str],
                          alpha: float | None = None) -> dict:
    """Translates `sources` (length penalty `alpha`; None: the translator's) and scores them: cased and
    lowercased sacreBLEU, throughput."""
    start = time.perf_counter()
    hypotheses = translator(params, sources, alpha)
    return score_translations(hypotheses, references, time.perf_counter() - start)


def evaluate_alphas(translator: Translator, params, sources: Sequence[str], references: Sequence[str],
                    alphas: Sequence[float]) -> dict[float, dict]:
    """{alpha: `evaluate_translations(..., alpha)`'s scores} for each of `alphas`, from one search
    (`Translator.with_alphas`); each throughput is that of the one search."""
    start = time.perf_counter()
    by_alpha = translator.with_alphas(params, sources, alphas)
    seconds = time.perf_counter() - start
    return {alpha: score_translations(hypotheses, references, seconds) for alpha, hypotheses in by_alpha.items()}


def choose_on_val(evaluate_val, alphas):
    """A decoding setting chosen on the development set, as the paper chose its beam and alpha:
    (the alpha whose val scores have the highest lowercased BLEU, the first of equals; {alpha: scores}).

    `evaluate_val(alpha)` returns the scores of decoding val with `alpha` (None: the config's), and
    says which alpha it used under "alpha".
    """
    search = {}
    for alpha in alphas:
        scores = evaluate_val(alpha)
        search[scores["alpha"]] = scores
    return max(search, key=lambda a: search[a]["bleu_lc"]), search
