"""sentencepiece tokenizer: reserved ids, training, the cache, loading a .model."""

import os
import pathlib

import pytest
import sentencepiece as spm

from tests.helpers import SMALL_CORPUS, small_bert_config
from unit_scaling.data import corpora, tokenizer as tok


@pytest.fixture(scope="module")
def corpus():
    return corpora.load_corpus(SMALL_CORPUS)


def test_cache_hit_on_second_use(corpus, monkeypatch):
    cache = pathlib.Path(os.environ[tok.CACHE_ENV])
    assert tok.cache_dir() == cache  # tests never touch ~/.cache
    first = tok.load_or_train_tokenizer(corpus, kind="bpe", vocab_size=600, sample_size=5000)
    assert not first.from_cache
    assert pathlib.Path(first.path).parent == cache / "tokenizers"
    assert pathlib.Path(first.path).with_suffix(".json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the second use must load from the cache, not train")

    monkeypatch.setattr(tok, "train_tokenizer", no_training)
    second = tok.load_or_train_tokenizer(corpus, kind="bpe", vocab_size=600, sample_size=5000)
    assert second.from_cache and second.path == first.path
    assert second.model_proto == first.model_proto
    # Any setting that changes the model changes the key.
    with pytest.raises(AssertionError, match="must load from the cache"):
        tok.load_or_train_tokenizer(corpus, kind="bpe", vocab_size=601, sample_size=5000)
    other = corpora.load_corpus("kjv:Ruth")
    assert tok.tokenizer_cache_key(
        other, kind="bpe", vocab_size=600, sample_size=5000
    ) != tok.tokenizer_cache_key(corpus, kind="bpe", vocab_size=600, sample_size=5000)


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_reserved_ids_and_round_trip(corpus, kind):
    t = tok.load_or_train_tokenizer(corpus, kind=kind, vocab_size=1000, sample_size=100_000)
    assert t.vocab_size == 1000
    assert [t.piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = t.encode("And God said, Let there be light: and there was light.")
    assert ids.dtype.name == "int32" and ids.min() >= tok.NUM_SPECIAL_TOKENS
    assert t.decode(ids) == "And God said, Let there be light: and there was light."
    # Special-token strings in text never become special ids.
    assert tok.MASK_ID not in t.encode("[MASK] [CLS] [SEP]").tolist()
    assert t.decode([tok.CLS_ID, *ids[:2].tolist(), tok.MASK_ID, tok.SEP_ID, 0, 0]).startswith(
        "[CLS] And God [MASK] [SEP]"
    )
    assert t.word_start[t.encode("And")[0]] and t.word_start[:5].all()


def test_load_existing_model_and_reject_bad_ones(corpus, tmp_path):
    t = tok.load_or_train_tokenizer(corpus, kind="bpe", vocab_size=600, sample_size=5000)
    config = small_bert_config(tokenizer_path=t.path, vocab_size=600)
    loaded = tok.tokenizer_from_config(config.data)
    assert loaded.model_proto == t.model_proto and loaded.path == t.path
    with pytest.raises(tok.TokenizerError, match=r"600 pieces but data.vocab_size=500"):
        tok.tokenizer_from_config(small_bert_config(tokenizer_path=t.path, vocab_size=500).data)
    with pytest.raises(tok.TokenizerError, match="does not exist"):
        tok.Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(tok.TokenizerError, match="not a sentencepiece model"):
        tok.Tokenizer.load(garbage)
    # A plain sentencepiece model (<unk>, <s>, </s>) lacks the reserved ids.
    plain = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus[0].sentences * 5),
        model_prefix=str(plain),
        vocab_size=120,
        model_type="bpe",
        minloglevel=2,
    )
    with pytest.raises(tok.TokenizerError, match=r"ids 0-4 must be \[PAD\] \[UNK\]"):
        tok.Tokenizer.load(f"{plain}.model")


def test_bad_settings_name_the_field(corpus):
    with pytest.raises(tok.TokenizerError, match="data.tokenizer='wordpiece'"):
        tok.load_or_train_tokenizer(corpus, kind="wordpiece", vocab_size=1000, sample_size=10)
    with pytest.raises(
        tok.TokenizerError,
        match=r"data.vocab_size=40 is smaller than the number of distinct characters",
    ):
        tok.train_tokenizer(corpus[0].sentences, kind="bpe", vocab_size=40)
    with pytest.raises(tok.TokenizerError, match="data.vocab_size=3 leaves no room"):
        tok.train_tokenizer(["a b"], kind="bpe", vocab_size=3)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_training_does_not_depend_on_the_machines_core_count(corpus, kind, monkeypatch):
    # sentencepiece's pieces depend on its thread count (checked: 1, 2 and 4 threads
    # give three different models), so the trainer must not take os.cpu_count().
    sentences = tok.sample_sentences(corpus, 3000)
    protos = []
    for cores in (1, 16):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        protos.append(tok.train_tokenizer(sentences, kind=kind, vocab_size=600).model_proto)
    assert protos[0] == protos[1]


def test_generated_continuation_keeps_its_word_boundary(corpus):
    from unit_scaling.generate import continuation_text

    t = tok.load_or_train_tokenizer(corpus, kind="unigram", vocab_size=1000, sample_size=100_000)
    ids = t.encode("In the beginning God created").tolist()
    cut = next(i for i in range(1, len(ids)) if t.word_start[ids[i]])  # a word starts here
    prompt = t.decode(ids[:cut])
    assert continuation_text(t, prompt, ids[cut:]) == "In the beginning God created"
    inside = next(i for i in range(1, len(ids)) if not t.word_start[ids[i]])  # mid-word
    assert continuation_text(t, t.decode(ids[:inside]), ids[inside:]) == t.decode(ids)
