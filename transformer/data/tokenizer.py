"""SentencePiece vocabulary: trained once on the training split, saved in the workdir, reused.

The paper (Section 5.1) uses one joint source/target vocabulary (~37k tokens for En-De); we train
one SentencePiece model on text from both languages. Reserved ids, fixed so that models, losses and
batches agree without asking the tokenizer:

    pad = 0   (padding; also what `decode` skips)
    eos = 1   (appended to every sentence by the input pipeline, not by `encode`)
    unk = 2
    bos: none (the decoder's start symbol is the shifted-in pad, see `transformer.shift_right`)

    tok = load_or_train_tokenizer(workdir + "/spm_8k", texts=lambda: train_texts, vocab_size=8000)
    tok.encode("A dog runs.") -> [412, 77, 1893, 5]
    tok.decode([412, 77, 1893, 5, 1, 0, 0]) -> "A dog runs."
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from transformer.tokens import EOS_ID, PAD_ID, UNK_ID


class Tokenizer:
    """A SentencePiece model with this project's reserved ids (pad 0, eos 1, unk 2)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
        self._sp = processor
        self.path = path
        self._piece_log_probs = None  # [vocab] float64, read on the first `nbest`
        ids = (processor.pad_id(), processor.eos_id(), processor.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"SentencePiece model {path} has (pad, eos, unk) ids {ids}, not {(PAD_ID, EOS_ID, UNK_ID)}: "
                "it was not trained by load_or_train_tokenizer. Delete it (or choose another path) to retrain.")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without eos."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos; pad (0) ids are skipped."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID])

    @property
    def lowercase(self) -> bool:
        """Whether the model folds case (normalization "nmt_nfkc_cf"): it encodes "A Dog" as "a dog"."""
        spec = sentencepiece_model_pb2.ModelProto.FromString(self.serialized_model()).normalizer_spec
        return spec.name.endswith("_cf")

    @property
    def model_type(self) -> str:
        """SentencePiece's model type: "unigram", "bpe", "word" or "char"."""
        spec = sentencepiece_model_pb2.ModelProto.FromString(self.serialized_model()).trainer_spec
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower()

    def nbest(self, text: str, n: int) -> tuple[list[list[int]], np.ndarray]:
        """The `n` most likely segmentations of `text` (best first, fewer where fewer exist; each
        without eos) and their [n] log-probabilities under the unigram model (sums of piece scores).

        Only a unigram model gives segmentations probabilities; for the others this raises.
        """
        if self._piece_log_probs is None:
            if self.model_type != "unigram":
                raise ValueError(f"Segmentation sampling needs a unigram vocabulary; {self.path} is a "
                                 f"{self.model_type!r} model. Set config.data.tokenizer='unigram' (a new workdir "
                                 "trains one), or leave config.data.subword_samples=0.")
            self._piece_log_probs = np.array([self._sp.get_score(i) for i in range(self.vocab_size)], np.float64)
        candidates = self._sp.nbest_encode_as_ids(text, nbest_size=n) or [[]]
        return candidates, np.array([self._piece_log_probs[c].sum() for c in candidates], np.float64)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The SentencePiece piece of each id ("▁A", "▁man", "</s>"), for labelling token positions."""
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()


def load_tokenizer(model_path: str) -> Tokenizer:
    """Loads `<prefix>.model`; a missing, unreadable or corrupt file raises naming path and fix."""
    try:
        with open(model_path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise OSError(f"Cannot read vocabulary file {model_path}: {e}. Check the path and its permissions, or delete "
                      "it so that load_or_train_tokenizer trains a new one.") from e
    processor = spm.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(proto)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError depending on the version.
        raise ValueError(f"Vocabulary file {model_path} is not a valid SentencePiece model ({e}). Delete it to "
                         "retrain it with load_or_train_tokenizer, or point to the right file.") from e
    return Tokenizer(processor, model_path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram",
                    character_coverage: float = 1.0, max_sentences: int = 2_000_000,
                    max_sentence_length: int = 4096, lowercase: bool = False) -> Tokenizer:
    """Trains a SentencePiece model on (at most `max_sentences` of) `texts`, in memory.

    `lowercase`: the model folds case as it normalizes ("nmt_nfkc_cf" instead of SentencePiece's
    default "nmt_nfkc"), in training and in every later `encode`, so ids and decoded text are lowercase.

    `vocab_size` is a soft limit (SentencePiece's hard_vocab_limit=False): a corpus too small for it
    yields a smaller vocabulary instead of an error; read `Tokenizer.vocab_size` for the real size.
    """
    sentences = (t for t in itertools.islice(texts, max_sentences) if t)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, hard_vocab_limit=False, max_sentence_length=max_sentence_length,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        # A "char" model maps each character to one id (spaces to "▁"): no dummy "▁" before each text,
        # so tokens are characters and bits per token are bits per character.
        add_dummy_prefix=model_type != "char",
        # NOTE: single-threaded training is deterministic, so every host trains the same vocabulary.
        num_threads=1, minloglevel=2)
    processor = spm.SentencePieceProcessor()
    processor.load_from_serialized_proto(model.getvalue())
    return Tokenizer(processor)


def load_or_train_tokenizer(path_prefix: str, texts: Iterable[str] | Callable[[], Iterable[str]] | None = None,
                            vocab_size: int = 8000, *, lowercase: bool = False, **train_kwargs) -> Tokenizer:
    """Loads `<path_prefix>.model` if it exists, else trains it on `texts` and saves it there.

    `lowercase` (see `train_tokenizer`) must match a model that exists.

    `texts` may be a zero-argument callable, called only when training is needed (so a reused
    vocabulary never touches the data). The file is written atomically: a crash mid-save leaves
    no half-written model that a later run would take as complete.
    """
    model_path = path_prefix + ".model"
    if os.path.exists(model_path):
        tok = load_tokenizer(model_path)
        if tok.lowercase != lowercase:
            raise ValueError(
                f"Vocabulary {model_path} {'folds' if tok.lowercase else 'keeps'} case, but lowercase={lowercase} was "
                f"asked for (config.data.lowercase). Use a new workdir, or set lowercase={tok.lowercase} to reuse it.")
        if tok.vocab_size != vocab_size:
            logging.info("Reusing %s with %d tokens (%d requested).", model_path, tok.vocab_size, vocab_size)
        return tok
    if texts is None:
        raise FileNotFoundError(f"No vocabulary at {model_path} and no texts to train one: pass texts=... or "
                                "point path_prefix at an existing <prefix>.model.")
    tok = train_tokenizer(texts() if callable(texts) else texts, vocab_size, lowercase=lowercase, **train_kwargs)
    tok.path = model_path
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp_path = f"{model_path}.tmp.{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(tok.serialized_model())
    os.replace(tmp_path, model_path)
    return tok


def translation_texts(examples: Sequence[dict]) -> Iterable[str]:
    """Both sides of `{"source", "target"}` examples, interleaved: text for one joint vocabulary."""
    for example in examples:
        yield example["source"]
        yield example["target"]
