"""Corpora: KJV, text files, tfds (unprepared, mock_data, locally built), sentences."""

import pytest
import tensorflow_datasets as tfds

from tests.helpers import SMALL_CORPUS
from unit_scaling.data import corpora, sentences, tfds_builder


def test_kjv_documents_are_chapters_and_sentences_are_verses():
    kjv = corpora.load_corpus("kjv")
    assert len(kjv) == 1189
    assert sum(len(d.sentences) for d in kjv) == 31102  # 31,103 verses minus one "[]"
    first = kjv[0]
    assert first.sentences[0] == "In the beginning God created the heaven and the earth."
    assert dict(first.metadata) == {"book": "Genesis", "chapter": 1, "testament": "OT"}
    assert kjv[len(kjv) - 1].metadata["book"] == "Revelation"
    assert len(corpora.load_corpus("kjv:nt")) == 260
    assert len(corpora.load_corpus("kjv:ot")) == 929
    small = corpora.load_corpus(SMALL_CORPUS)
    assert len(small) == 50 + 28 and small[50].metadata == {
        "book": "Matthew",
        "chapter": 1,
        "testament": "NT",
    }
    assert len(corpora.load_corpus("kjv:1_samuel+song of solomon")) == 31 + 8


def test_kjv_fingerprint_depends_on_books():
    assert (
        corpora.load_corpus("kjv:Ruth").fingerprint()
        != corpora.load_corpus("kjv:Jonah").fingerprint()
    )
    assert (
        corpora.load_corpus("kjv:Ruth").fingerprint()
        == corpora.load_corpus("kjv:ruth").fingerprint()
    )


def test_bad_specs_name_the_field_and_the_fix():
    with pytest.raises(corpora.CorpusError, match=r"unknown book 'Hezekiah'.*Genesis, Exodus"):
        corpora.load_corpus("kjv:Genesis+Hezekiah")
    with pytest.raises(corpora.CorpusError, match=r"data.corpus='wiki'.*unknown source"):
        corpora.load_corpus("wiki")
    with pytest.raises(corpora.CorpusError, match="data.corpus='' is empty"):
        corpora.load_corpus("")


def test_text_files_paragraphs_and_sentences(tmp_path):
    (tmp_path / "b.txt").write_text(
        "Dr. Watson arrived at 5 p.m. sharp. He sat down!\nThen he spoke.\n\n"
        '"Is it you?" she asked. Yes.\n'
    )
    (tmp_path / "a.txt").write_text("One line only")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("Deep file. Second sentence.")
    corpus = corpora.load_corpus(f"text:{tmp_path}/**/*.txt")
    assert [d.metadata["path"].rsplit("/", 1)[-1] for d in corpus] == ["a.txt", "b.txt", "c.txt"]
    assert corpus[0].sentences == ("One line only",)
    assert corpus[1].sentences == (
        "Dr. Watson arrived at 5 p.m. sharp.",
        "He sat down!",
        "Then he spoke.",
        '"Is it you?" she asked.',
        "Yes.",
    )
    before = corpus.fingerprint()
    (tmp_path / "a.txt").write_text("Another text, longer than before.")
    assert corpora.load_corpus(f"text:{tmp_path}/**/*.txt").fingerprint() != before


def test_missing_and_empty_text_corpora_fail_early(tmp_path):
    with pytest.raises(corpora.CorpusError, match="matches no files.*text:/data/books"):
        corpora.load_corpus(f"text:{tmp_path}/nothing/*.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(corpora.CorpusError, match="all 1 matched files are empty"):
        corpora.load_corpus(f"text:{tmp_path}/*.txt")


def test_sentence_splitter_keeps_initials_and_abbreviations():
    assert sentences.split_sentences("J. R. R. Tolkien wrote it, e.g. The Hobbit. It sold.") == [
        "J. R. R. Tolkien wrote it, e.g. The Hobbit.",
        "It sold.",
    ]
    assert sentences.split_sentences("Wait... what? No (really). 3 cats.") == [
        "Wait... what?",
        "No (really).",
        "3 cats.",
    ]
    assert sentences.split_paragraphs("a\nb\n \n\nc") == ["a b", "c"]


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    # lm1b is a registered builder with nothing prepared in tmp_path: no download may
    # happen, only an error with the commands that prepare it.
    with pytest.raises(corpora.TfdsNotPreparedError) as err:
        corpora.load_corpus("tfds:lm1b", tfds_data_dir=str(tmp_path))
    message = str(err.value)
    assert "not prepared" in message and "--prepare_tfds=lm1b" in message
    assert "download_and_prepare" in message and "array_record" in message
    assert not any(tmp_path.rglob("*.array_record*"))
    with pytest.raises(
        corpora.TfdsNotPreparedError, match="knows no dataset 'no_such_dataset_xyz'"
    ):
        corpora.load_corpus("tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
    with pytest.raises(corpora.CorpusError, match="not NAME"):
        corpora.load_corpus("tfds:")


def test_tfds_mock_data_text_feature():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        corpus = corpora.load_corpus("tfds:lm1b:train")
        assert corpus.text_feature == "text" and len(corpus) == 12
        documents = list(corpus)
    assert all(isinstance(s, str) and s for d in documents for s in d.sentences)
    assert sum(len(d.sentences) for d in documents) >= 12


def test_tfds_builder_round_trips_a_local_corpus(tmp_path):
    spec = tfds_builder.build_tfds_corpus(
        "kjv:Ruth+Jonah", name="ruth_jonah", data_dir=str(tmp_path)
    )
    assert spec == "tfds:unit_scaling_text/ruth_jonah"
    built = corpora.load_corpus(spec, tfds_data_dir=str(tmp_path))
    source = corpora.load_corpus("kjv:Ruth+Jonah")
    assert built.text_feature == "sentences" and len(built) == len(source) == 8
    assert [d.sentences for d in built] == [d.sentences for d in source]
    assert built[4].metadata["title"] == "Jonah 1"
    with pytest.raises(corpora.CorpusError, match=r"no split 'validation'.*\['train'\]"):
        corpora.load_corpus(spec + ":validation", tfds_data_dir=str(tmp_path))
