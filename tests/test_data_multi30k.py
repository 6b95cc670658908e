"""The Multi30k TFDS builder and the TFDS source path that WMT and lm1b share: sizes, text, errors."""

import gzip
import os

import pytest
import tensorflow_datasets as tfds

from transformer import data
from transformer.data import multi30k


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, multi30k_dir):
    """A TFDS data_dir with Multi30k prepared from the local raw files (no download)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    data.load_translation_split("multi30k", "train", data_dir=path, manual_dir=multi30k_dir)
    return path


@pytest.mark.parametrize("split, stem, size", [("train", "train", 29_000), ("validation", "val", 1_014),
                                               ("test", "test_2016_flickr", 1_000)])
def test_splits_have_paper_sizes_and_text_round_trips(data_dir, read_lines, split, stem, size):
    ds = data.load_translation_split("multi30k", split, data_dir=data_dir)
    assert len(ds) == size
    # In file order (line i of the test set is reference i), exactly the raw text.
    assert [ds[i] for i in range(len(ds))] == [
        {"source": en, "target": de} for en, de in zip(read_lines(f"{stem}.en.gz"), read_lines(f"{stem}.de.gz"))]


def test_either_direction(data_dir):
    en_de = data.load_translation_split("multi30k", "test", data_dir=data_dir)
    de_en = data.load_translation_split("multi30k", "test", data_dir=data_dir, source_lang="de", target_lang="en")
    assert de_en[7] == {"source": en_de[7]["target"], "target": en_de[7]["source"]}


def test_unknown_language_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="multi30k has no language 'fr'"):
        data.load_translation_split("multi30k", "test", data_dir=data_dir, target_lang="fr")


def test_missing_data_directory_names_path_and_fix(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*manual_dir="):
        data.load_translation_split("multi30k", "train", data_dir=str(tmp_path / "tfds"), manual_dir=missing)


def test_empty_data_directory_names_path_and_fix(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'raw'} is empty.*train.en.gz"):
        data.load_translation_split("multi30k", "train", data_dir=str(tmp_path / "tfds"),
                                    manual_dir=str(tmp_path / "raw"))


def write_raw(directory, lines_per_file: dict[str, int]) -> None:
    directory.mkdir(exist_ok=True)
    for stem in multi30k.RAW_SPLITS.values():
        for lang in multi30k.LANGUAGES:
            n = lines_per_file.get(f"{stem}.{lang}", 3)
            with gzip.open(directory / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(f"{lang} sentence {i}\n" for i in range(n)))


def test_unequal_line_counts_fail_and_leave_nothing_half_built(tmp_path):
    raw, tfds_dir = tmp_path / "raw", tmp_path / "tfds"
    write_raw(raw, {"val.de": 2})
    with pytest.raises(ValueError, match=f"{raw / 'val.en.gz'}: 3 lines, {raw / 'val.de.gz'}: 2 lines"):
        data.load_translation_split("multi30k", "train", data_dir=str(tfds_dir), manual_dir=str(raw))
    built = tfds_dir / "multi30k"
    assert not built.exists() or not any(p.name.startswith(("1.0.0", "incomplete")) for p in built.iterdir())
    # With the files fixed, the same data_dir prepares normally: no stale state blocks it.
    write_raw(raw, {})
    assert len(data.load_translation_split("multi30k", "validation", data_dir=str(tfds_dir), manual_dir=str(raw))) == 3


def test_missing_file_is_named(tmp_path):
    write_raw(tmp_path, {})
    os.remove(tmp_path / "test_2016_flickr.de.gz")
    with pytest.raises(FileNotFoundError, match="lacks test_2016_flickr.de.gz"):
        multi30k.raw_files(str(tmp_path))


class FakeWmtTranslate(tfds.core.GeneratorBasedBuilder):
    """Stands in for `wmt14_translate/de-en` (features named by language code), which needs a download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"de": tfds.features.Text(), "en": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"de": f"Satz {i}", "en": f"sentence {i}"}


class FakeLm(tfds.core.GeneratorBasedBuilder):
    """Stands in for `lm1b` (one "text" feature)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"line {i} ü"}


def test_catalogue_builders_go_through_the_same_path(tmp_path):
    ds = data.load_translation_split("fake_wmt_translate", "train", data_dir=str(tmp_path), source_lang="de",
                                     target_lang="en")
    assert sorted(ds[i]["source"] for i in range(len(ds))) == [f"Satz {i}" for i in range(5)]
    assert {ds[i]["source"][5:] == ds[i]["target"][9:] for i in range(len(ds))} == {True}
    assert os.path.isdir(tmp_path / "fake_wmt_translate" / "1.0.0")
    assert any("array_record" in p for p in os.listdir(tmp_path / "fake_wmt_translate" / "1.0.0"))


def test_text_source_for_language_modelling(tmp_path):
    texts = data.load_text_split("fake_lm", "train", data_dir=str(tmp_path))
    assert sorted(texts) == [f"line {i} ü" for i in range(4)]
