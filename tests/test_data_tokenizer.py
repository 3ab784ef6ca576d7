"""Byte-level BPE tokenizer: exact round trips, deterministic training, save and load."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.data import (
    END_OF_DOCUMENT,
    PADDING,
    SPECIAL_TOKENS_FILE,
    CorpusConfig,
    Tokenizer,
    build_corpus,
    copy_tokenizer,
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


def _hf_folder(tmp_path, tokenizer, files: dict) -> None:
    tokenizer.save(tmp_path)
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))


def test_special_ids_come_from_the_hugging_face_files(tmp_path, tokenizer):
    # "<|pad|>" as a dict, eos ids as a list in generation_config.json, merged in order
    eos = tokenizer.backend.id_to_token(300)
    files = {
        "tokenizer_config.json": {"eos_token": eos, "pad_token": {"content": PADDING}},
        "config.json": {"model_type": "x", "eos_token_id": 0, "bos_token_id": 5},
        "generation_config.json": {"eos_token_id": [7, 0]},
    }
    _hf_folder(tmp_path, tokenizer, files)
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.eos_ids, loaded.eot_id, loaded.pad_id) == ((300, 0, 7), 300, 1)
    assert (loaded.bos_id, loaded.add_bos) == (5, False)  # no post-processor adds it
    # add_bos_token: the bos goes first in prompts and documents
    files["tokenizer_config.json"]["add_bos_token"] = True
    _hf_folder(tmp_path, tokenizer, files)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode_prompt("x") == [5, *tokenizer.encode("x")]
    assert loaded.encode_prompt("") == [5]
    assert loaded.document_ids([9]) == [5, 9, 300]
    # recorded beside a copy, read back the same
    copy_tokenizer(tmp_path, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / SPECIAL_TOKENS_FILE).read_text())["eos_tokens"][0] == eos
    assert Tokenizer.load(tmp_path / "copy") == loaded


def test_moekit_tokenizers_record_nothing_and_load_as_before(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    assert not (tmp_path / SPECIAL_TOKENS_FILE).exists()
    loaded = Tokenizer.load(tmp_path)
    assert loaded == tokenizer and (loaded.eos_ids, loaded.bos_id, loaded.add_bos) == (
        (0,),
        None,
        False,
    )
    assert loaded.encode_prompt("") == [0] and loaded.document_ids([9]) == [9, 0]


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"config.json": {"model_type": "x", "eos_token_id": "2"}},
            "eos_token_id '2' is not an id",
        ),
        ({"generation_config.json": {"pad_token_id": 10**6}}, "pad_token_id 1000000 is not an id"),
        ({"tokenizer_config.json": {"bos_token": 3}}, "bos_token must be a string"),
        (
            {"tokenizer_config.json": {"add_bos_token": "yes"}},
            "add_bos_token must be true or false",
        ),
        ({"special_tokens_map.json": {"eos_token": "<none>"}}, "names eos_token '<none>'"),
        ({"tokenizer_config.json": ["x"]}, "holds list, not a JSON object"),
    ],
)
def test_bad_special_token_files_are_one_error_naming_file_and_value(
    tmp_path, tokenizer, files, message
):
    _hf_folder(tmp_path, tokenizer, files)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / next(iter(files))) in str(error.value)
