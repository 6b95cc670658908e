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

from transformer.data import synthetic
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
    if run.data.synthetic:
        return _synthetic_inputs(run)
    from transformer import data  # noqa: PLC0415 -- TFDS, grain and SentencePiece only for real data

    train_source = _load_split(run, run.data.train_split)
    texts = (functools.partial(data.translation_texts, train_source) if run.objective == "translation"
             else lambda: (train_source[i] for i in range(len(train_source))))
    tokenizer = data.load_or_train_tokenizer(os.path.join(workdir, "spm"), texts=texts,
                                             vocab_size=run.data.vocab_size, model_type=run.data.tokenizer)
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
    return data.load_text_split(d.name, split, data_dir=d.data_dir, manual_dir=d.manual_dir)


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
