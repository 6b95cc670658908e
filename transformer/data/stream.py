"""One long token stream, read as consecutive segments of B parallel streams (Transformer-XL's batchify).

    tokens = encode_stream(texts, tokenizer)          # every text's ids, then eos: [N] int32
    it = StreamIterator(tokens, num_streams=B, length=T)
    batch = next(it)   # {"inputs": [B, T], "targets": [B, T], "memory_reset": [B]} int32
    it.set_state(it.get_state())                      # {"step": k}, saved with checkpoints

The stream is cut into B rows of N // B tokens (row b holds tokens [b * N/B, (b + 1) * N/B)), and
step k reads tokens [k T, (k + 1) T) of every row: targets are those tokens, inputs the same shifted
right by one, so the first input of segment k + 1 is the last target of segment k (the first input
of a row is BOS = PAD_ID, as `models.shift_right` would make it). A row's last N/B mod T tokens are
never read. After the last whole segment the rows start over (the next epoch) with `memory_reset`
set: a Transformer-XL memory (`transformer.memory`) must not carry the end of a row into its start.

Every batch is a pure function of the step, so resuming needs only `{"step": k}`. Multi-process:
each process reads its own rows of the global batch (`process_index`, `process_count`).

Legend: B streams (rows), T segment length, N stream length.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from transformer.data import synthetic
from transformer.tokens import PAD_ID


def encode_stream(texts: Iterable[str], tokenizer) -> np.ndarray:
    """Every text's ids followed by eos, concatenated in order: [N] int32 (eos separates the texts)."""
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, np.int32)


def batchify(tokens: np.ndarray, num_streams: int) -> np.ndarray:
    """[N] -> [B, N // B]: B contiguous pieces of the stream, one per row (the remainder is dropped)."""
    width = len(tokens) // num_streams
    return np.asarray(tokens[:num_streams * width], np.int32).reshape(num_streams, width)


def segment(streams: np.ndarray, index: int, length: int) -> dict[str, np.ndarray]:
    """Segment `index` of `streams` [B, W]: {"inputs", "targets": [B, T], "memory_reset": [B]} int32."""
    start = index * length
    targets = streams[:, start:start + length]
    if start == 0:
        inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)  # BOS first
    else:
        inputs = streams[:, start - 1:start + length - 1]  # the previous segment's last token first
    reset = np.full(streams.shape[0], start == 0, np.int32)
    return {"inputs": np.ascontiguousarray(inputs), "targets": np.ascontiguousarray(targets), "memory_reset": reset}


class StreamIterator:
    """Consecutive segments of `num_streams` parallel streams of `tokens`; checkpointable as {"step": k}.

    The same interface as the other input iterators: `next(it)`, `get_state()`, `set_state()`.
    `num_epochs=None` repeats forever; otherwise iteration ends after that many passes.
    """

    def __init__(self, tokens: np.ndarray, *, num_streams: int, length: int, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        if num_streams % process_count:
            raise ValueError(f"{num_streams} streams cannot be split evenly across {process_count} processes.")
        streams = batchify(tokens, num_streams)
        self.segments_per_epoch = streams.shape[1] // length
        if self.segments_per_epoch < 1:
            raise ValueError(f"A stream of {len(tokens)} tokens in {num_streams} rows holds {streams.shape[1]} tokens "
                             f"a row, less than one segment of {length}: use fewer rows (batch size) or a shorter "
                             "segment (data.max_length).")
        rows = num_streams // process_count
        self._streams = streams[process_index * rows:(process_index + 1) * rows]
        self._length, self._num_epochs, self._step = length, num_epochs, 0

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, index = divmod(self._step, self.segments_per_epoch)
        if self._num_epochs is not None and epoch >= self._num_epochs:
            raise StopIteration
        self._step += 1
        return segment(self._streams, index, self._length)

    def get_state(self) -> dict[str, int]:
        """The step of the next segment: JSON-serialisable, saved with checkpoints."""
        return {"step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])


def synthetic_stream(seed: int, num_tokens: int, vocab_size: int, row_length: int = 64) -> np.ndarray:
    """`num_tokens` of the synthetic Markov-chain text (`synthetic.lm_batch`'s rows, eos-separated,
    padding removed), a pure function of `seed`: [num_tokens] int32."""
    pieces, total, step = [], 0, 0
    while total < num_tokens:
        rows = synthetic.lm_batch(step, seed=seed, batch_size=64, length=row_length, vocab_size=vocab_size)["targets"]
        for row in rows:
            pieces.append(row[row != PAD_ID])  # content, then eos
            total += len(pieces[-1])
        step += 1
    return np.concatenate(pieces)[:num_tokens].astype(np.int32)
