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
(`synthetic` holds synthetic tasks for tests and smoke runs.)
"""

from transformer.data.batching import bucket_batches, bucket_boundaries
from transformer.data.pipeline import lm_batches, prefetch_to_device, translation_batches
from transformer.data.sources import load_text_split, load_translation_split
from transformer.data.tokenizer import (EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_or_train_tokenizer, load_tokenizer,
                                        train_tokenizer, translation_texts)

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "Tokenizer",
    "bucket_batches",
    "bucket_boundaries",
    "lm_batches",
    "load_or_train_tokenizer",
    "load_text_split",
    "load_tokenizer",
    "load_translation_split",
    "prefetch_to_device",
    "train_tokenizer",
    "translation_batches",
    "translation_texts",
]
