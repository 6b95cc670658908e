"""Datasets as random-access sources (len + __getitem__), read through TFDS without TensorFlow.

Every dataset goes down one path: `tfds.builder(name)` -> `download_and_prepare` into array_record
files -> `as_data_source(split)`, which grain (or plain indexing) reads with random access, so
shuffling, sharding and resuming need no pass over the data.

    load_translation_split("multi30k", "train", manual_dir="data/multi30k")   # our builder
    load_translation_split("wmt14_translate/de-en", "train")                  # TFDS catalogue
    load_translation_split("wmt17_translate/de-en", "test", source_lang="de", target_lang="en")
    load_text_split("lm1b", "train")                                          # for DecoderOnly

Translation examples come out as `{"source": str, "target": str}` in either direction; text
examples as `str`. TFDS's WMT builders download several GB and need a lot of disk and time the first
time; prepare once (e.g. on process 0, or with `tfds build --file_format=array_record`) before a
multi-host run, since concurrent preparation of one data_dir is not supported by TFDS.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow_datasets as tfds

from transformer.data import multi30k  # registers the "multi30k" builder with TFDS

FILE_FORMAT = "array_record"  # random access without TensorFlow


class TranslationSource(Sequence):
    """Random-access view of a TFDS translation split as `{"source": str, "target": str}`."""

    def __init__(self, source, source_lang: str, target_lang: str):
        self._source = source
        self.source_lang, self.target_lang = source_lang, target_lang

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, str]:
        record = self._source[_checked(index, len(self))]
        return {"source": _text(record[self.source_lang]), "target": _text(record[self.target_lang])}


class TextSource(Sequence):
    """Random-access view of one text feature of a TFDS split, as `str`."""

    def __init__(self, source, feature: str = "text"):
        self._source, self._feature = source, feature

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return _text(self._source[_checked(index, len(self))][self._feature])


def _checked(index: int, length: int) -> int:
    """`index` within [0, length), negative ones counted from the end; IndexError (ends iteration) otherwise."""
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index % length


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prepared_builder(name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
    """The TFDS builder `name`, prepared as array_record under `data_dir` (TFDS's default if None)."""
    if manual_dir is not None and name.split("/")[0] == "multi30k":
        multi30k.raw_files(manual_dir)  # a missing or empty directory fails here, naming it
    builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
    return builder


def load_translation_split(name: str, split: str, *, source_lang: str = "en", target_lang: str = "de",
                           data_dir: str | None = None, manual_dir: str | None = None) -> TranslationSource:
    """Split `split` of translation dataset `name` as a random-access `TranslationSource`.

    `name`: "multi30k", "wmt14_translate/de-en", "wmt17_translate/de-en", or any TFDS translation
    builder whose features are language codes. `manual_dir`: local raw files (Multi30k: the
    `*.{en,de}.gz` files; then nothing is downloaded).
    """
    builder = prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir)
    languages = set(builder.info.features.keys())
    for lang in (source_lang, target_lang):
        if lang not in languages:
            raise ValueError(f"{name} has no language {lang!r}; it has {sorted(languages)}.")
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang are both {source_lang!r}.")
    return TranslationSource(builder.as_data_source(split=split), source_lang, target_lang)


def load_text_split(name: str, split: str, *, feature: str = "text", data_dir: str | None = None,
                    manual_dir: str | None = None) -> TextSource:
    """Split `split` of a text dataset (e.g. "lm1b") as a random-access source of `str`."""
    builder = prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir)
    if feature not in builder.info.features.keys():
        raise ValueError(f"{name} has no feature {feature!r}; it has {sorted(builder.info.features.keys())}.")
    return TextSource(builder.as_data_source(split=split), feature)

