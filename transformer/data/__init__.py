"""The input pipeline: real text in, deterministic and resumable batches out. Knows nothing of the model.

    from transformer import data
    train = data.load_translation_split("multi30k", "train", manual_dir="data/multi30k")  # or "wmt14_translate/de-en"
    tok = data.load_or_train_tokenizer(workdir + "/spm", texts=lambda: data.translation_texts(train), vocab_size=8000)
    it = data.translation_batches(train, tok, batching="bucket", tokens_per_batch=25_000, max_length=256, seed=0)
    batch = next(it)                       # {"inputs": [B, L], "targets": [B, L]} int32, 0 = pad, eos-terminated
    it.set_state(it.get_state())           # JSON-serialisable position, saved in checkpoints
    it = data.prefetch_to_device(it, 2, sharding)   # global jax.Arrays, still checkpointable

Modules:
  tokenizer  SentencePiece vocabulary (pad 0, eos 1, unk 2), trained once and reused
  multi30k   the TFDS builder for Multi30k task 1 (local raw files or download)
  sources    TFDS datasets (Multi30k, WMT, lm1b) as random-access sources, without TensorFlow
  batching   pure batching functions: padding, token-budget length bucketing, bucket iterator
  pipeline   grain pipelines: shard -> shuffle -> tokenise -> batch; device prefetch
  subwords   subword regularization: one of a sentence's n best segmentations per read (Kudo, 2018)
  stream     one token stream as consecutive segments of parallel rows (Transformer-XL's batchify)
(`synthetic` holds synthetic tasks for tests and smoke runs.)
"""

import importlib

# Names this package exports -> the submodule that defines them. Submodules are imported on first
# use (PEP 562), so `transformer.data.synthetic` or `.pipeline` loads neither TFDS nor SentencePiece.
_EXPORTS = {
    "bucket_batches": "batching", "bucket_boundaries": "batching",
    "lm_batches": "pipeline", "prefetch_to_device": "pipeline", "translation_batches": "pipeline",
    "load_text_split": "sources", "load_translation_split": "sources",
    "EOS_ID": "tokenizer", "PAD_ID": "tokenizer", "UNK_ID": "tokenizer", "Tokenizer": "tokenizer",
    "load_or_train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "translation_texts": "tokenizer",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
