"""Examples in, batches out: deterministic, resumable, sharded across hosts (built on grain).

    it = translation_batches(train, tok, batching="bucket", tokens_per_batch=25_000, max_length=256)
    batch = next(it)      # {"inputs": [B, L] int32, "targets": [B, L] int32}, 0 = padding, eos-terminated
    state = it.get_state()   # JSON-serialisable; saved with the trainer's checkpoint
    it.set_state(state)      # a fresh iterator continues with exactly the next unseen batch

The stages, each a grain dataset (so each is checkpointable and the whole is deterministic):

  source[process_index::process_count]   this host's disjoint shard (together: all examples)
  .map(tokenize)                         eos appended; done once, up front, for a shard of up to
                                         `in_memory_examples` (Multi30k: 29k pairs in ~8 s), else per read
  .shuffle(seed).repeat(num_epochs)      a fresh permutation every epoch, a pure function of seed
  .map_with_index(sample)                subword regularization only: one of each sentence's n best
                                         segmentations per read (`transformer.data.subwords`)
  .filter/.map(max_length)               too-long examples dropped or truncated
  .to_iter_dataset(threads)              reading and tokenisation in parallel threads, order kept
  pad | bucket | pack  -> batches        see `transformer.data.batching`
  thread prefetch                        batching off the training thread

Batch sizes (`batch_size`, `tokens_per_batch`) are per host. With packing, a row holds several
examples and the batch has `<feature>_segment_ids` / `<feature>_positions` too.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from transformer.data import batching as batching_lib, subwords

BATCHINGS = ("pad", "bucket", "pack")


def tokenized_dataset(source: Sequence, to_example: Callable[[Any], batching_lib.Example], *, max_length: int,
                      eos_id: int, truncate: bool = False, seed: int = 0, shuffle: bool = True,
                      num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                      read_threads: int = 4, in_memory_examples: int = 200_000,
                      sample: Callable[[int, Any], batching_lib.Example] | None = None) -> grain.IterDataset:
    """This host's shard of `source`, shuffled per epoch, tokenised by `to_example`, within `max_length`.

    `sample(index, element)`, if given, turns what `to_example` made into an example for read number
    `index` of the repeated stream (subword regularization draws a segmentation there), before the
    length filter.

    A shard of at most `in_memory_examples` is read and tokenised once, into memory: every epoch
    after the first then costs no reading, parsing or tokenising (on a 2-core CPU that host work
    took ~10% of the accelerator-side step; the batches are the same either way).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} examples cannot be split across {process_count} processes.")
    ds = grain.MapDataset.source(source).slice(slice(process_index, None, process_count)).map(to_example)
    in_memory = len(ds) <= in_memory_examples
    if in_memory:
        ds = grain.MapDataset.source(_read_all(ds, read_threads))
    if shuffle:
        ds = ds.shuffle(seed=seed)  # NOTE: repeat() after shuffle() reshuffles every epoch
    ds = ds.repeat(num_epochs)
    if sample is not None:
        ds = ds.map_with_index(sample)
    if truncate:
        ds = ds.map(functools.partial(batching_lib.truncate, max_length=max_length, eos_id=eos_id))
    else:
        ds = ds.filter(functools.partial(batching_lib.fits, max_length=max_length))
    threads = 0 if in_memory else read_threads
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=256 if threads else 0))


def _read_all(ds: grain.MapDataset, threads: int) -> list:
    """Every element of `ds`, in order (read in `threads` threads)."""
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=256)))
    try:
        return list(it)
    finally:
        it.close()


def batched_dataset(ds: grain.IterDataset, features: Sequence[str], *, batching: str, max_length: int,
                    batch_size: int | None = None, tokens_per_batch: int | None = None, seed: int = 0,
                    shuffle: bool = True, drop_remainder: bool = True, row_multiple: int = 8,
                    packing_bins: int | None = None, host_prefetch: int = 2) -> grain.IterDataset:
    """Batches of [B, L] int32 arrays from examples of eos-terminated [T] arrays (see module docstring).

    pad:    [batch_size, max_length]; `drop_remainder=False` keeps a smaller last batch.
    bucket: [tokens_per_batch // L rounded down to row_multiple, L], L a bucket boundary; no example
            is dropped (`drop_remainder` does not apply); some batches have empty (all-pad) rows.
    pack:   [batch_size, max_length] with segment ids and positions; `packing_bins` rows are filled
            at once (default 4 * batch_size: more bins, fuller rows).
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching={batching!r}: use one of {BATCHINGS}.")
    if batching in ("pad", "pack") and not batch_size:
        raise ValueError(f"batching={batching!r} needs batch_size.")
    if batching == "bucket" and not tokens_per_batch:
        raise ValueError("batching='bucket' needs tokens_per_batch.")
    if batching == "pad":
        ds = ds.map(functools.partial(batching_lib.pad_example, length=max_length))
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    elif batching == "bucket":
        ds = batching_lib.BucketIterDataset(
            ds, boundaries=batching_lib.bucket_boundaries(max_length), tokens_per_batch=tokens_per_batch,
            row_multiple=row_multiple, seed=seed, shuffle=shuffle)
    else:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={k: max_length for k in features}, num_packing_bins=packing_bins or 4 * batch_size,
            seed=seed, shuffle_bins=shuffle)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if host_prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=host_prefetch)
    return ds


def encode_with_eos(tok, text: str) -> np.ndarray:
    """[T] int32 ids of `text` followed by eos."""
    return np.asarray(tok.encode(text) + [tok.eos_id], np.int32)


def _encoder(tok, subword_samples: int, subword_alpha: float) -> Callable[[str], Any]:
    """text -> eos-terminated ids, or (subword regularization) its `Segmentations` to draw from."""
    if subword_samples <= 1:
        return functools.partial(encode_with_eos, tok)
    return functools.partial(subwords.segmentations, tok, eos_id=tok.eos_id, n=subword_samples, alpha=subword_alpha)


def _sampler(subword_samples: int, seed: int):
    return functools.partial(subwords.sample_example, seed=seed) if subword_samples > 1 else None


def translation_batches(examples: Sequence[dict], tok, *, batching: str = "bucket", max_length: int = 256,
                        truncate: bool = False, seed: int = 0, shuffle: bool = True,
                        num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                        read_threads: int = 4, in_memory_examples: int = 200_000, subword_samples: int = 0,
                        subword_alpha: float = 0.1, **batch_kwargs) -> grain.DatasetIterator:
    """Iterator of {"inputs", "targets"} [B, L] int32 batches from `{"source": str, "target": str}` examples.

    `num_epochs=None` repeats forever; `in_memory_examples`: see `tokenized_dataset`.
    `subword_samples` > 1: each read of a sentence (both sides, drawn independently) is one of its
    `subword_samples` best segmentations, drawn with probability P(x) ** `subword_alpha` (Kudo, 2018;
    `transformer.data.subwords`; needs a unigram `tok`); 0 = always the best. `batch_kwargs`:
    batch_size, tokens_per_batch, drop_remainder, row_multiple, packing_bins, host_prefetch (see
    `batched_dataset`).
    """
    encode = _encoder(tok, subword_samples, subword_alpha)

    def to_example(example):
        return {"inputs": encode(example["source"]), "targets": encode(example["target"])}

    ds = tokenized_dataset(examples, to_example, max_length=max_length, eos_id=tok.eos_id, truncate=truncate,
                           seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                           process_count=process_count, read_threads=read_threads,
                           in_memory_examples=in_memory_examples, sample=_sampler(subword_samples, seed))
    return iter(batched_dataset(ds, ("inputs", "targets"), batching=batching, max_length=max_length, seed=seed,
                                shuffle=shuffle, **batch_kwargs))


def lm_batches(texts: Sequence, tok, *, batching: str = "pack", max_length: int = 256, truncate: bool = False,
               seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
               process_count: int = 1, read_threads: int = 4, in_memory_examples: int = 200_000,
               subword_samples: int = 0, subword_alpha: float = 0.1, **batch_kwargs) -> grain.DatasetIterator:
    """Iterator of {"targets"} [B, L] int32 batches for language modelling from `str` (or {"text": str}).

    Arguments as `translation_batches`'."""
    encode = _encoder(tok, subword_samples, subword_alpha)

    def to_example(text):
        return {"targets": encode(text["text"] if isinstance(text, dict) else text)}

    ds = tokenized_dataset(texts, to_example, max_length=max_length, eos_id=tok.eos_id, truncate=truncate,
                           seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                           process_count=process_count, read_threads=read_threads,
                           in_memory_examples=in_memory_examples, sample=_sampler(subword_samples, seed))
    return iter(batched_dataset(ds, ("targets",), batching=batching, max_length=max_length, seed=seed,
                                shuffle=shuffle, **batch_kwargs))


class DevicePrefetchIterator:
    """Keeps `size` batches already transferred to devices; checkpointable like the host iterator.

    `get_state()` is the host iterator's state just after the last batch *returned*, not after the
    last one prefetched, so a checkpoint never skips the batches sitting in the device buffer.
    """

    def __init__(self, iterator, size: int = 2, sharding: jax.sharding.Sharding | None = None):
        self._iterator, self._size, self._sharding = iterator, size, sharding
        self._queue: collections.deque = collections.deque()
        self._state = iterator.get_state()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        while len(self._queue) < self._size:
            try:
                host_batch = next(self._iterator)
            except StopIteration:
                break
            self._queue.append((self._put(host_batch), self._iterator.get_state()))
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def _put(self, batch):
        if self._sharding is None:
            return jax.device_put(batch)
        # Each process holds its own rows: the global batch is the concatenation over processes.
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch)

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self._queue.clear()
        self._iterator.set_state(state)
        self._state = state


def prefetch_to_device(iterator, size: int = 2,
                       sharding: jax.sharding.Sharding | None = None) -> DevicePrefetchIterator:
    """Wraps a batch iterator so that `size` batches are on devices (as global arrays over `sharding`) ahead of use."""
    return DevicePrefetchIterator(iterator, size, sharding)
