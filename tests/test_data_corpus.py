"""The default corpus, its split and cache, the math generator, and user text loading."""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from fractions import Fraction
from pathlib import Path

import pytest

import moekit.data.corpus as corpus_module
from moekit.data import (
    CORPUS_VERSION,
    DOMAINS,
    CorpusConfig,
    Document,
    build_corpus,
    corpus_sha256,
    generate_problems,
    load_documents,
    split_documents,
)
from moekit.data.corpus import _split_source
from moekit.data.docstrings import Docstring, split_docstrings

SMALL = CorpusConfig(
    code_modules=("textwrap.py", "bisect.py", "heapq.py"),
    max_prose_topics=10,
    max_languages=3,
    num_math_problems=100,
)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    """The full default corpus, built once for the tests that read it (about 3 s)."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


# --- default corpus ---------------------------------------------------------------------


def test_default_corpus_is_deterministic(default_corpus, tmp_path):
    # A second cold build in another cache: same documents, same order, same split, hash.
    second = build_corpus(tmp_path)
    assert default_corpus.train == second.train
    assert default_corpus.validation == second.validation
    assert default_corpus.sha256 == second.sha256
    assert second.sha256 == corpus_sha256(second.train, second.validation)
    assert (second.name, second.version) == ("default", CORPUS_VERSION)


def test_default_corpus_has_every_domain_in_both_splits_without_overlap(default_corpus):
    corpus = default_corpus
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
    # About 3.4 M training tokens at vocab 4096 (docs/data.md): no token repeats within
    # twice the default budget of 1.38 M, still trainable on a CPU.
    assert 9_000_000 < total_chars < 14_000_000
    texts = [d.text for d in corpus.train + corpus.validation]
    assert len(set(texts)) == len(texts)


def test_code_and_prose_share_no_text(default_corpus):
    # Docstrings are moved from code to prose, never copied: no code document holds a
    # docstring, and no paragraph of a prose docstring document is in the code, whatever
    # its indentation (the corpus checks line by line; this checks another way).
    documents = default_corpus.train + default_corpus.validation
    code = {}
    for d in documents:
        if d.domain == "code":
            module, index = d.id.removeprefix("code/").split("#")
            code.setdefault(module, []).append((int(index), d.text))
    assert len(code) > 400
    for module in sorted(code)[::10]:  # a sample: parsing all 6 MB takes seconds
        tree = ast.parse("".join(text for _, text in sorted(code[module])))
        definitions = [tree] + [
            node for node in ast.walk(tree)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]  # fmt: skip
        assert all(ast.get_docstring(node) is None for node in definitions), module

    def words(text: str) -> str:
        return " ".join(text.split())

    code_words = words("\n".join(d.text for d in documents if d.domain == "code"))
    prose = [d for d in documents if d.id.startswith("prose/docstrings/")]
    assert sum(len(d.text) for d in prose) > 1_000_000
    # A sample of paragraphs (each search reads 6 MB), among them base64's and heapq's,
    # whose modules repeat a docstring paragraph in a string literal.
    sample = [
        d for d in prose if d.id.startswith(("prose/docstrings/base64", "prose/docstrings/heapq"))
    ]
    paragraphs = [words(p) for d in sample + prose[::60] for p in d.text.split("\n\n")]
    long_paragraphs = [p for p in paragraphs if len(p) >= 80]
    assert len(long_paragraphs) > 150
    assert not [p for p in long_paragraphs if p in code_words]


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


def test_split_docstrings_worked_example():
    source = (
        '"""Module doc."""\n'
        "import os\n"
        "\n"
        "class A:\n"
        '    """Class doc,\n'
        '    on two lines."""\n'
        "\n"
        "    def f(self):\n"
        "        '''Method doc.'''\n"
        "        return 1\n"
        "\n"
        'def g(): "stays: it shares its line"\n'
        "\f\n"  # a form feed, which str.splitlines would take for a line break
        "if os.name:\n"
        "    def h():\n"
        '        """Only a docstring."""\n'
    )
    code, cut, kept = split_docstrings(source, "m")
    assert cut == [
        Docstring("m", "Module doc."),
        Docstring("m.A", "Class doc,\non two lines."),
        Docstring("m.A.f", "Method doc."),
        Docstring("m.h", "Only a docstring."),
    ]
    assert kept == ["stays: it shares its line"]
    assert code == (
        "import os\n"
        "\n"
        "class A:\n"
        "\n"
        "    def f(self):\n"
        "        return 1\n"
        "\n"
        'def g(): "stays: it shares its line"\n'
        "\f\n"
        "if os.name:\n"
        "    def h():\n"
        "        pass\n"
    )
    ast.parse(code)
    assert Docstring("m.A", "Two\n\nlines").entry() == "m.A\n    Two\n\n    lines\n"


def test_split_is_stable():
    # Validation holds the ceil(5%) ids with the smallest SHA-256, whatever the text,
    # the order or the Python version: the same 5 of 100 math ids in every release.
    documents = [Document(id=f"math/{i:06d}", domain="math", text="") for i in range(100)]
    random.Random(0).shuffle(documents)
    _, validation = split_documents(documents, validation_fraction=0.05)
    expected = ["math/000015", "math/000037", "math/000050", "math/000068", "math/000072"]
    assert sorted(d.id for d in validation) == expected


def test_math_documents_are_distinct(tmp_path):
    corpus = build_corpus(tmp_path, CorpusConfig(domains=("math",), num_math_problems=3000))
    texts = [d.text for d in corpus.train + corpus.validation]
    assert len(texts) == 3000 and len(set(texts)) == 3000
    # The first problems are the generator's first ones; repeats drawn later are skipped.
    assert generate_problems(1, seed=0)[0].text() in texts


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
