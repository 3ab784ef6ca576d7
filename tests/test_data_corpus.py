"""The default corpus, its split and cache, the math generator, and user text loading."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from fractions import Fraction
from pathlib import Path

import pytest

import moekit.data.corpus as corpus_module
from moekit.data import (
    DOMAINS,
    CorpusConfig,
    Document,
    build_corpus,
    generate_problems,
    load_documents,
    split_documents,
)
from moekit.data.corpus import _split_source

SMALL = CorpusConfig(
    code_modules=("textwrap.py", "bisect.py", "heapq.py"),
    max_prose_topics=10,
    max_languages=3,
    num_math_problems=100,
)


# --- default corpus ---------------------------------------------------------------------


def test_default_corpus_is_deterministic(tmp_path):
    # Two cold builds in separate caches: same documents, same order, same split.
    first = build_corpus(tmp_path / "a")
    second = build_corpus(tmp_path / "b")
    assert first.train == second.train
    assert first.validation == second.validation
    assert [d.id for d in first.train] == [d.id for d in second.train]


def test_default_corpus_has_every_domain_in_both_splits_without_overlap(tmp_path):
    corpus = build_corpus(tmp_path)
    train_ids = {d.id for d in corpus.train}
    validation_ids = {d.id for d in corpus.validation}
    assert not train_ids & validation_ids
    assert len(train_ids) == len(corpus.train) and len(validation_ids) == len(corpus.validation)
    stats = corpus.stats()
    assert list(stats) == list(DOMAINS)
    for domain, row in stats.items():
        assert row["train_docs"] > 0 and row["val_docs"] > 0, domain
        # ceil(5%) of the domain's documents are held out.
        assert row["val_docs"] == -(-(row["train_docs"] + row["val_docs"]) * 5 // 100), domain
    total_chars = sum(row["train_chars"] + row["val_chars"] for row in stats.values())
    assert 2_000_000 < total_chars < 6_000_000  # a few MB: trainable on a CPU


def test_second_build_reads_the_cache(tmp_path, monkeypatch):
    first = build_corpus(tmp_path, SMALL)
    assert (first.path / "meta.json").is_file()

    def fail(config):
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(corpus_module, "collect_documents", fail)
    second = build_corpus(tmp_path, SMALL)
    assert second == first and second.path == first.path


def test_cache_is_invalidated_by_version_and_config(tmp_path, monkeypatch):
    first = build_corpus(tmp_path, SMALL)
    other_config = build_corpus(tmp_path, CorpusConfig(**{**SMALL.__dict__, "math_seed": 1}))
    monkeypatch.setattr(corpus_module, "CORPUS_VERSION", "test-next")
    other_version = build_corpus(tmp_path, SMALL)
    assert len({first.path, other_config.path, other_version.path}) == 3
    assert other_version.path.name.startswith("corpus-test-next-")
    assert other_version == first


def test_unknown_domain_is_rejected():
    with pytest.raises(ValueError, match="poetry"):
        CorpusConfig(domains=("code", "poetry"))


def test_code_chunks_are_whole_top_level_blocks():
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    chunks = _split_source(source, chunk_chars=2000)
    assert len(chunks) > 2
    assert "".join(chunks) == source
    for chunk in chunks[1:]:
        assert chunk.startswith(("def ", "class ", "async def ", "@"))


def test_dialogue_documents_are_turns(tmp_path):
    corpus = build_corpus(tmp_path, SMALL)
    documents = corpus.train + corpus.validation
    english = [d for d in documents if d.domain == "dialogue"]
    other = [d for d in documents if d.domain == "multilingual"]
    assert all(d.id.startswith("dialogue/english/") for d in english)
    assert len({d.id.split("/")[1] for d in other}) == 3
    greetings = next(d for d in english if d.id == "dialogue/english/greetings")
    assert greetings.text.startswith("A: ") and "\nB: " in greetings.text


# --- split --------------------------------------------------------------------------------


def test_split_depends_only_on_ids():
    documents = [Document(id=f"doc{i}", domain="abc"[i % 3], text=str(i)) for i in range(300)]
    train, validation = split_documents(documents, validation_fraction=0.1)
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    train_2, validation_2 = split_documents(shuffled, validation_fraction=0.1)
    assert {d.id for d in validation} == {d.id for d in validation_2}
    assert len(validation) == 30 and len(train) == 270
    assert {d.domain for d in validation} == {"a", "b", "c"}


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="1.5"):
        split_documents([], validation_fraction=1.5)


# --- math generator -----------------------------------------------------------------------


def _expected_answer(kind: str, question: str) -> str:
    """Recompute a problem's answer from its question alone."""
    numbers = [int(n) for n in re.findall(r"-?\d+", question)]
    if kind in ("addition", "subtraction", "multiplication", "order_of_operations"):
        expression = re.search(r"(?:Compute|Evaluate) (.*)\.$", question).group(1)
        return str(eval(expression.replace("×", "*")))  # digits and + - * ( ) only
    if kind == "division":
        dividend, divisor = numbers
        return f"{dividend // divisor} remainder {dividend % divisor}"
    if kind == "fractions":
        left, op, right = re.search(r"Compute (\S+) (\S) (\S+)\.", question).groups()
        x, y = Fraction(left), Fraction(right)
        return str({"+": x + y, "-": x - y, "×": x * y}[op])
    if kind == "percent":
        percent, whole = numbers
        return str(Fraction(percent * whole, 100))
    if kind == "word_problem":
        start, packs, per_pack, given = numbers
        return str(start + packs * per_pack - given)
    raise AssertionError(kind)


def _linear_value(expression: str, x: int) -> int:
    """Evaluate '3x - 4', '-x', '2(x + 5) - 3(x - 1)' at x."""
    python = re.sub(r"(\d)\(", r"\1*(", expression)
    python = re.sub(r"(\d)x", r"\1*x", python)
    return eval(python, {"x": x})


def test_math_answers_are_correct():
    problems = generate_problems(1000, seed=3)
    assert {p.kind for p in problems} == {
        "addition", "subtraction", "multiplication", "division", "fractions", "percent",
        "order_of_operations", "linear_equation", "expand_and_collect", "word_problem",
    }  # fmt: skip
    for p in problems:
        if p.kind == "linear_equation":
            left, right = re.search(r"Solve for x: (.*) = (.*)\.$", p.question).groups()
            x = int(p.answer.removeprefix("x = "))
            assert _linear_value(left, x) == _linear_value(right, x), p.text()
        elif p.kind == "expand_and_collect":
            expression = re.search(r"Simplify (.*)\.$", p.question).group(1)
            for x in (-3, 0, 2, 7):
                assert _linear_value(expression, x) == _linear_value(p.answer, x), p.text()
        else:
            assert p.answer == _expected_answer(p.kind, p.question), p.text()
        assert p.text().endswith(f"Answer: {p.answer}\n")


def test_math_generator_is_seeded():
    assert generate_problems(50, seed=7) == generate_problems(50, seed=7)
    assert generate_problems(50, seed=7) != generate_problems(50, seed=8)


# --- user text ----------------------------------------------------------------------------


def test_load_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("héllo\n", encoding="utf-8")
    records = [{"text": "first"}, {"text": "second", "domain": "notes"}]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(map(json.dumps, records)) + "\n\n", encoding="utf-8"
    )
    (tmp_path / "ignored.csv").write_text("x,y\n", encoding="utf-8")

    documents = load_documents(tmp_path, default_domain="user")
    assert documents == [
        Document(id="a.jsonl:1", domain="user", text="first"),
        Document(id="a.jsonl:2", domain="notes", text="second"),
        Document(id="b/one.txt", domain="user", text="héllo\n"),
    ]
    assert load_documents(tmp_path / "b" / "one.txt") == [Document("one.txt", "text", "héllo\n")]


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.txt"))):
        load_documents(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="contains no .txt or .jsonl"):
        load_documents(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        load_documents(tmp_path)
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="must end in .txt or .jsonl"):
        load_documents(tmp_path / "data.csv")


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("ok é ".encode() + b"\xff rest")  # 'ok é ' is 6 bytes
    with pytest.raises(ValueError, match=r"bad.txt.*0xff at byte offset 6"):
        load_documents(path)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.jsonl' line 3 .*'text'"):
        load_documents(path)
    path.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_documents(path)
