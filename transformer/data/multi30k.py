"""Multi30k (task 1, English-German image descriptions) as a TFDS builder, registered as "multi30k".

Splits: train 29,000 pairs, validation 1,014 (`val`), test 1,000 (`test_2016_flickr`); features
`{"en": Text, "de": Text}`, kept in file order (so test hypotheses line up with the references).

Raw files: `{train,val,test_2016_flickr}.{en,de}.gz`, gzip, one sentence per line. They are read
from the TFDS manual directory when one is given (`DownloadConfig(manual_dir=...)`, or files in
`<data_dir>/downloads/manual/`), and otherwise downloaded from the dataset's public repository.
Elliott, Frank, Sima'an and Specia (2016), "Multi30K: Multilingual English-German Image Descriptions".

TFDS writes array_record files (read back by `tfds.data_sources`/grain, without TensorFlow) into an
`incomplete.*` directory and renames it only once every split is written, so a failed build leaves
nothing that a later run would take for a prepared dataset.
"""

from __future__ import annotations

import gzip
import os

import tensorflow_datasets as tfds

LANGUAGES = ("en", "de")
# TFDS split name -> raw file stem.
RAW_SPLITS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{stem}.{lang}.gz"

_FIX = ("Put the Multi30k task-1 raw files ({files}) there, or pass the directory that holds them "
        "(manual_dir=...), or leave manual_dir unset to download them.")


def raw_files(directory: str) -> dict[str, dict[str, str]]:
    """{split: {lang: path}} of the raw files in `directory`; raises naming the path and the fix."""
    names = ", ".join(f"{stem}.{lang}.gz" for stem in RAW_SPLITS.values() for lang in LANGUAGES)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Multi30k directory {directory} does not exist. " + _FIX.format(files=names))
    paths = {split: {lang: os.path.join(directory, f"{stem}.{lang}.gz") for lang in LANGUAGES}
             for split, stem in RAW_SPLITS.items()}
    missing = [p for langs in paths.values() for p in langs.values() if not os.path.isfile(p)]
    if missing:
        state = "is empty" if not os.listdir(directory) else "lacks " + ", ".join(os.path.basename(p) for p in missing)
        raise FileNotFoundError(f"Multi30k directory {directory} {state}. " + _FIX.format(files=names))
    return paths


def read_parallel(paths: dict[str, str]) -> dict[str, list[str]]:
    """{lang: lines} of one split's gzip files; raises if they are empty or differ in line count."""
    lines = {}
    for lang, path in paths.items():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines[lang] = f.read().splitlines()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"Cannot read {path} as gzip-compressed UTF-8 text ({e}). Replace it with the "
                             "original file from the Multi30k repository.") from e
        if not lines[lang]:
            raise ValueError(f"{path} is empty. Replace it with the original file from the Multi30k repository.")
    counts = {paths[lang]: len(v) for lang, v in lines.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{p}: {n} lines" for p, n in counts.items())
        raise ValueError(f"Parallel files differ in line count ({listed}); line i of each must translate the "
                         "other. Replace them with the original pair from the Multi30k repository.")
    return lines


class Multi30k(tfds.core.GeneratorBasedBuilder):
    """Multi30k task 1, English-German."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Task 1 raw text: train, val, test_2016_flickr."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Place {train,val,test_2016_flickr}.{en,de}.gz from data/task1/raw of the Multi30k "
        "repository (github.com/multi30k/dataset) in the manual directory; without it they are downloaded.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Multi30k task 1: English descriptions of Flickr30k images and German translations.",
            features=tfds.features.FeaturesDict({lang: tfds.features.Text() for lang in LANGUAGES}),
            supervised_keys=("en", "de"),
            homepage="https://github.com/multi30k/dataset",
            disable_shuffling=True,  # keep file order: line i of the test set is reference i
            citation="Elliott, Frank, Sima'an and Specia (2016). Multi30K: Multilingual English-German Image "
                     "Descriptions. Proceedings of the 5th Workshop on Vision and Language.",
        )

    def _split_generators(self, dl_manager):
        manual_dir = _manual_dir(dl_manager)
        if manual_dir is not None:
            paths = raw_files(os.fspath(manual_dir))
        else:
            urls = {split: {lang: URL.format(stem=stem, lang=lang) for lang in LANGUAGES}
                    for split, stem in RAW_SPLITS.items()}
            paths = {split: {lang: os.fspath(p) for lang, p in langs.items()}
                     for split, langs in dl_manager.download(urls).items()}
        # Read (and check) every split before writing any, so bad input fails before TFDS writes.
        lines = {split: read_parallel(paths[split]) for split in RAW_SPLITS}
        return {split: self._generate_examples(lines[split]) for split in RAW_SPLITS}

    def _generate_examples(self, lines: dict[str, list[str]]):
        for i, pair in enumerate(zip(*(lines[lang] for lang in LANGUAGES))):
            yield i, dict(zip(LANGUAGES, pair))


def _manual_dir(dl_manager) -> str | None:
    """The manual directory if one exists and is non-empty, else None (then we download)."""
    try:
        return dl_manager.manual_dir
    except AssertionError:  # TFDS raises this for a missing or empty manual directory.
        return None
