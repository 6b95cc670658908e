"""What the trainer reads: this process's shard of the training stream and of an eval split.

Synthetic data needs nothing but numpy; real data loads TFDS, grain and SentencePiece, imported
only here, only then (`transformer.data` itself imports its submodules on first use).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

from transformer.data import stream as stream_lib, synthetic
from transformer.run_config import DataConfig, TrainConfig


@dataclasses.dataclass
class Inputs:
    """This process's training stream (None when only evaluating) and eval split."""

    train: Any  # iterator of {name: int32 [local_batch, length]} with get_state() / set_state(), or None
    eval_batches: Callable[[], Iterator[dict]]  # a fresh pass over the eval split
    vocab_size: int  # the text vocabulary (synthetic: data.vocab_size; real: the tokenizer's size)
    tokenizer: Any = None  # real data: the SentencePiece tokenizer (encode / decode / eos_id)
    eval_texts: tuple[list[str], list[str]] | None = None  # translation: (sources, references) for BLEU


def local_rows(global_rows: int, what: str) -> int:
    """This process's share of `global_rows` rows."""
    count = jax.process_count()
    if global_rows % count:
        raise ValueError(f"config.{what}={global_rows} is not divisible by the {count} processes.")
    return global_rows // count


def make_inputs(run: TrainConfig, workdir: str) -> Inputs:
    """The training stream and eval split that `run.data` names; trains the vocabulary if it must."""
    if run.data.batching == "stream":
        return _stream_inputs(run, workdir)
    if run.data.synthetic:
        return _synthetic_inputs(run)
    from transformer import data  # noqa: PLC0415 -- TFDS, grain and SentencePiece only for real data

    train_source = _load_split(run, run.data.train_split)
    texts = (functools.partial(data.translation_texts, train_source) if run.objective == "translation"
             else lambda: (train_source[i] for i in range(len(train_source))))
    tokenizer = data.load_or_train_tokenizer(os.path.join(workdir, "spm"), texts=texts,
                                             vocab_size=run.data.vocab_size, model_type=run.data.tokenizer,
                                             lowercase=run.data.lowercase)
    batch_kwargs = dict(batching=run.data.batching, max_length=run.data.max_length, seed=run.seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
    if run.data.batching == "bucket":
        if jax.process_count() > 1:
            # NOTE: each host buckets its own shard, so hosts could disagree on a step's batch shape.
            raise ValueError("config.data.batching='bucket' is single-host only: use 'pack' (fixed shapes) "
                             f"with {jax.process_count()} processes.")
        batch_kwargs.update(tokens_per_batch=run.data.tokens_per_batch, row_multiple=max(8, jax.local_device_count()))
    else:
        batch_kwargs.update(batch_size=local_rows(run.data.batch_size, "data.batch_size"))
    batches = data.translation_batches if run.objective == "translation" else data.lm_batches
    if run.data.subword_samples:
        batch_kwargs.update(subword_samples=run.data.subword_samples, subword_alpha=run.data.subword_alpha)
    train = batches(train_source, tokenizer, **batch_kwargs)
    return dataclasses.replace(eval_inputs(run, tokenizer, run.data.eval_split), train=train)


def eval_inputs(run: TrainConfig, tokenizer, split: str) -> Inputs:
    """Only the eval split `split` of real data, batched with `tokenizer`: no training pipeline."""
    from transformer import data  # noqa: PLC0415

    source = _load_split(run, split)
    rows = local_rows(run.data.eval_batch_size, "data.eval_batch_size")
    kwargs = dict(batching="pad", max_length=run.data.max_length, shuffle=False, num_epochs=1, batch_size=rows,
                  drop_remainder=False, truncate=True, process_index=jax.process_index(),
                  process_count=jax.process_count())
    batches = data.translation_batches if run.objective == "translation" else data.lm_batches
    eval_batches = lambda: _padded_rows(batches(source, tokenizer, **kwargs), rows)  # noqa: E731
    eval_texts = None
    if run.objective == "translation":
        examples = [source[i] for i in range(len(source))]
        eval_texts = ([e["source"] for e in examples], [e["target"] for e in examples])
    return Inputs(None, eval_batches, tokenizer.vocab_size, tokenizer, eval_texts)


def _load_split(run: TrainConfig, split: str):
    from transformer import data  # noqa: PLC0415

    d: DataConfig = run.data
    if run.objective == "translation":
        return data.load_translation_split(d.name, split, source_lang=d.source_lang, target_lang=d.target_lang,
                                           data_dir=d.data_dir, manual_dir=d.manual_dir)
    return data.load_text_split(d.name, split, feature=d.text_feature or "text", data_dir=d.data_dir,
                                manual_dir=d.manual_dir)


def _stream_inputs(run: TrainConfig, workdir: str) -> Inputs:
    """Language modelling on one token stream per split, read as consecutive segments
    (`transformer.data.stream`): the synthetic Markov-chain text, or every text of a real split in order."""
    d = run.data
    tokenizer = None
    if d.synthetic:
        # About 64 training segments per epoch; `eval_batches` segments per evaluation.
        train_tokens = stream_lib.synthetic_stream(run.seed, 64 * d.batch_size * d.max_length, d.vocab_size)
        eval_tokens = stream_lib.synthetic_stream(10**6 + run.seed, d.eval_batches * d.eval_batch_size * d.max_length,
                                                  d.vocab_size)
        vocab_size = d.vocab_size
    else:
        from transformer import data  # noqa: PLC0415 -- TFDS and SentencePiece only for real data

        train_source, eval_source = _load_split(run, d.train_split), _load_split(run, d.eval_split)
        texts = lambda: (train_source[i] for i in range(len(train_source)))  # noqa: E731
        tokenizer = data.load_or_train_tokenizer(os.path.join(workdir, "spm"), texts=texts, vocab_size=d.vocab_size,
                                                 model_type=d.tokenizer, lowercase=d.lowercase)
        train_tokens = stream_lib.encode_stream(texts(), tokenizer)
        eval_tokens = stream_lib.encode_stream((eval_source[i] for i in range(len(eval_source))), tokenizer)
        vocab_size = tokenizer.vocab_size
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train = stream_lib.StreamIterator(train_tokens, num_streams=d.batch_size, length=d.max_length, **shard)
    return Inputs(train, _stream_eval_batches(run, eval_tokens), vocab_size, tokenizer)


def stream_eval_inputs(run: TrainConfig, tokenizer, split: str) -> Inputs:
    """Only the stream of real split `split`, encoded with `tokenizer`: no training pipeline."""
    tokens = stream_lib.encode_stream((text for text in _load_split(run, split)), tokenizer)
    return Inputs(None, _stream_eval_batches(run, tokens), tokenizer.vocab_size, tokenizer)


def _stream_eval_batches(run: TrainConfig, tokens) -> Callable[[], Iterator[dict]]:
    """A fresh pass, segment by segment, over `tokens` in data.eval_batch_size parallel streams."""
    return lambda: stream_lib.StreamIterator(tokens, num_streams=run.data.eval_batch_size, length=run.data.max_length,
                                             num_epochs=1, process_index=jax.process_index(),
                                             process_count=jax.process_count())


def _synthetic_inputs(run: TrainConfig) -> Inputs:
    d = run.data
    fn = functools.partial(synthetic.synthetic_batch, d.task) if run.objective == "translation" else synthetic.lm_batch
    process_index = jax.process_index()
    train_kwargs = dict(batch_size=local_rows(d.batch_size, "data.batch_size"), length=d.max_length,
                        vocab_size=d.vocab_size)
    eval_kwargs = dict(train_kwargs, batch_size=local_rows(d.eval_batch_size, "data.eval_batch_size"))
    # Each process draws its own rows; eval uses a disjoint seed range.
    train = synthetic.SyntheticIterator(fn, seed=run.seed * 1000 + process_index, **train_kwargs)
    eval_batches = lambda: _take(  # noqa: E731
        synthetic.SyntheticIterator(fn, seed=10**6 + run.seed * 1000 + process_index, **eval_kwargs), d.eval_batches)
    return Inputs(train, eval_batches, d.vocab_size)


def _padded_rows(batches, rows: int):
    """Pads each batch to `rows` rows of padding (weight 0), so eval compiles one shape per length."""
    for batch in batches:
        yield {k: np.pad(v, ((0, rows - v.shape[0]),) + ((0, 0),) * (v.ndim - 1)) for k, v in batch.items()}


def _take(iterator, n):
    for _ in range(n):
        yield next(iterator)
