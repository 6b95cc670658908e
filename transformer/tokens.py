"""The special token ids that every vocabulary of this project shares, in one place.

SentencePiece vocabularies (`transformer.data.tokenizer`) and the synthetic tasks
(`transformer.data.synthetic`) both put padding at 0, end-of-sequence at 1 and unknown at 2. The
decoder starts from PAD_ID (the model shifts targets right by one, filling with 0).

Masked language modelling needs one more symbol, [MASK], that no text can contain: it is the id
right after the text vocabulary, so an MLM model has `mlm_vocab_size(text_vocab_size)` outputs and
no SentencePiece piece (or synthetic token) is ever reinterpreted as [MASK].
"""

PAD_ID = 0  # padding; also the decoder's start symbol
EOS_ID = 1  # end of sequence: ends every example, never masked in MLM
UNK_ID = 2  # an unknown piece (SentencePiece)

# Ids that MLM never selects for corruption (padding and the end of the text).
MLM_UNMASKED_IDS = (PAD_ID, EOS_ID)


def mask_id(text_vocab_size: int) -> int:
    """The [MASK] id of an MLM model over `text_vocab_size` text ids: one past the last of them."""
    return text_vocab_size


def mlm_vocab_size(text_vocab_size: int) -> int:
    """The output vocabulary of an MLM model: the text vocabulary plus [MASK]."""
    return text_vocab_size + 1
