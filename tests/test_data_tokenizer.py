"""SentencePiece vocabulary: round trip, reserved ids, reuse without retraining, clear errors."""

import os
import unicodedata

import pytest

from transformer import data


@pytest.fixture(scope="module")
def texts(read_lines):
    return [s for pair in zip(read_lines("train.en.gz", 3000), read_lines("train.de.gz", 3000)) for s in pair]


@pytest.fixture(scope="module")
def tok(texts, tmp_path_factory):
    return data.load_or_train_tokenizer(str(tmp_path_factory.mktemp("vocab") / "spm"), texts=texts, vocab_size=600)


def test_reserved_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == 600
    assert tok.encode("漢")[-1] == tok.unk_id  # a character never seen in training
    assert tok.pieces([tok.pad_id, tok.eos_id, tok.unk_id]) == ["<pad>", "</s>", "<unk>"]


def test_round_trip_on_held_out_sentences(tok, read_lines):
    sentences = read_lines("val.en.gz") + read_lines("val.de.gz")
    for s in sentences:
        ids = tok.encode(s)
        assert ids and 0 not in ids and tok.eos_id not in ids
        # SentencePiece normalises (NFKC, whitespace runs to one space): text comes back in that form.
        assert tok.decode(ids) == " ".join(unicodedata.normalize("NFKC", s).split())


def test_decode_stops_at_eos_and_skips_pad(tok):
    ids = tok.encode("A dog runs on the beach.")
    assert tok.decode([0] + ids + [tok.eos_id] + tok.encode("Something else.") + [0, 0]) == "A dog runs on the beach."
    assert tok.decode([tok.eos_id] + ids) == ""


def test_vocabulary_reused_not_retrained(tmp_path, texts):
    prefix = str(tmp_path / "spm")
    first = data.load_or_train_tokenizer(prefix, texts=lambda: iter(texts[:2000]), vocab_size=300)
    mtime = os.stat(prefix + ".model").st_mtime_ns

    def must_not_train():
        raise AssertionError("retrained although the vocabulary exists")

    second = data.load_or_train_tokenizer(prefix, texts=must_not_train, vocab_size=300)
    assert second.serialized_model() == first.serialized_model()
    assert os.stat(prefix + ".model").st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["spm.model"]  # no temporary file left behind


def test_lowercase_vocabulary_reads_and_writes_lowercase(tmp_path, texts):
    folded = data.load_or_train_tokenizer(str(tmp_path / "lc"), texts=texts[:2000], vocab_size=300, lowercase=True)
    cased = data.load_or_train_tokenizer(str(tmp_path / "cased"), texts=texts[:2000], vocab_size=300)
    assert (folded.lowercase, cased.lowercase) == (True, False)
    sentence = "Ein Mann mit Hut steht vor der Straße."
    assert folded.encode(sentence) == folded.encode(sentence.lower())
    assert folded.encode("A DOG RUNS.") == folded.encode("a dog runs.")
    assert cased.encode("A DOG RUNS.") != cased.encode("a dog runs.")
    assert folded.decode(folded.encode(sentence)) == sentence.lower()  # "ß" stays, as in str.lower
    assert cased.decode(cased.encode(sentence)) == sentence
    # Folding frees the pieces a cased vocabulary spends on capitals: fewer pieces per sentence.
    count = lambda tok: sum(len(tok.encode(s)) for s in texts[2000:2400])  # noqa: E731
    assert count(folded) < count(cased)
    assert data.load_tokenizer(str(tmp_path / "lc.model")).lowercase  # the folding is saved in the model


def test_reusing_a_vocabulary_of_the_other_case_is_a_clear_error(tmp_path, texts):
    prefix = str(tmp_path / "spm")
    data.load_or_train_tokenizer(prefix, texts=texts[:2000], vocab_size=300)
    with pytest.raises(ValueError, match=r"spm.model keeps case, but lowercase=True.*new workdir"):
        data.load_or_train_tokenizer(prefix, texts=texts[:2000], vocab_size=300, lowercase=True)
    assert not data.load_or_train_tokenizer(prefix, vocab_size=300).lowercase


def test_corrupt_vocabulary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=f"{path}.*(Delete it|retrain)"):
        data.load_or_train_tokenizer(str(tmp_path / "spm"), texts=["unused"], vocab_size=100)


def test_unreadable_vocabulary_file_is_a_clear_error(tmp_path):
    os.mkdir(tmp_path / "spm.model")  # a path that exists but cannot be read as a file
    with pytest.raises(OSError, match=f"Cannot read vocabulary file {tmp_path / 'spm.model'}"):
        data.load_or_train_tokenizer(str(tmp_path / "spm"), texts=["unused"], vocab_size=100)


def test_missing_vocabulary_without_texts_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="spm.model.*texts="):
        data.load_or_train_tokenizer(str(tmp_path / "spm"), vocab_size=100)


def test_foreign_model_with_other_reserved_ids_is_rejected(tmp_path, texts):
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[:1000]), model_writer=model, vocab_size=200,
                                   minloglevel=2)  # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad
    (tmp_path / "spm.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not trained by load_or_train_tokenizer"):
        data.load_or_train_tokenizer(str(tmp_path / "spm"), vocab_size=200)
