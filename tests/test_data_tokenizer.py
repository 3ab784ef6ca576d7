"""Byte-level BPE tokenizer: exact round trips, deterministic training, save and load."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.data import (
    END_OF_DOCUMENT,
    PADDING,
    CorpusConfig,
    Tokenizer,
    build_corpus,
    train_tokenizer,
)

SMALL = CorpusConfig(
    code_modules=("textwrap.py", "bisect.py"),
    max_prose_topics=8,
    max_languages=4,
    num_math_problems=200,
)
VOCAB_SIZE = 600


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    corpus = build_corpus(tmp_path_factory.mktemp("corpus"), SMALL)
    return [d.text for d in corpus.train]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=VOCAB_SIZE)


SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  two leading spaces, trailing tab\t",
    "Grüße aus Köln — “quotes”, ½, 日本語のテキスト, 😀👍🏽",
    "Привет! ¿Qué tal? שלום\r\n\x00\x7f",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_identity(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.eot_id, tokenizer.pad_id) == (0, 1)
    # The special token is one id in a stream and decodes back to its text.
    ids = tokenizer.encode("a") + [tokenizer.eot_id] + tokenizer.encode("b")
    assert tokenizer.decode(ids) == f"a{END_OF_DOCUMENT}b"
    assert tokenizer.backend.token_to_id(PADDING) == 1


def test_text_spelling_a_special_token_stays_text(tokenizer):
    text = f"a{END_OF_DOCUMENT}b{PADDING}"
    ids = tokenizer.encode(text)
    assert tokenizer.eot_id not in ids and tokenizer.pad_id not in ids
    assert tokenizer.decode(ids) == text


def test_merges_compress_the_training_text(tokenizer, texts):
    text = texts[0]
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_training_is_deterministic(tokenizer, texts):
    again = train_tokenizer(texts, vocab_size=VOCAB_SIZE)
    assert again == tokenizer and again.sha256() == tokenizer.sha256()


def test_save_and_load(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded == tokenizer and loaded.sha256() == tokenizer.sha256()
    assert Tokenizer.load(path) == tokenizer
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size \(100\)"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="no tokenizer file"):
        Tokenizer.load(tmp_path)
