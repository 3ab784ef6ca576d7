"""A run's data from a built-in corpus: the corpus line it prints and RUN/data/corpus.json."""

from __future__ import annotations

import json
import re

import pytest

from moekit.data import CorpusConfig, PackageCorpusConfig, build_corpus
from moekit.train import prepare_run_data

SMALL = CorpusConfig(
    code_modules=("textwrap.py", "bisect.py"),
    max_prose_topics=5,
    max_languages=2,
    num_math_problems=100,
)
LINE = re.compile(
    r"corpus: (\w+) v(\d+), ([\d.]+) M chars, ([\d.]+) M train tokens, "
    r"([\d.]+) M validation tokens, sha256 ([0-9a-f]{12})"
)


def test_default_corpus_line_and_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    lines = []
    data = prepare_run_data(tmp_path / "run", vocab_size=300, corpus_config=SMALL, log=lines.append)
    corpus = build_corpus(config=SMALL)
    [line] = lines
    name, version, chars, train_tokens, val_tokens, sha = LINE.fullmatch(line).groups()
    assert (name, version, sha) == ("default", "2", corpus.sha256[:12])
    assert float(chars) == pytest.approx(corpus.num_chars / 1e6, rel=5e-3)
    assert float(train_tokens) == pytest.approx(len(data.train) / 1e6, rel=5e-3)
    assert float(val_tokens) == pytest.approx(len(data.validation) / 1e6, rel=5e-3)
    record = json.loads((tmp_path / "run" / "data" / "corpus.json").read_text(encoding="utf-8"))
    assert record["sha256"] == corpus.sha256 and record["chars"] == corpus.num_chars
    assert (record["train_tokens"], record["validation_tokens"]) == (
        len(data.train),
        len(data.validation),
    )
    # Read back (a resumed run, the dense twin's copy): nothing tokenised, nothing printed.
    prepare_run_data(tmp_path / "run", vocab_size=300, corpus_config=SMALL, log=lines.append)
    assert len(lines) == 1


def test_held_out_corpus_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    lines = []
    data = prepare_run_data(
        tmp_path / "run",
        data="builtin:packages",
        vocab_size=300,
        corpus_config=PackageCorpusConfig(packages=("tqdm",)),
        log=lines.append,
    )
    [line] = lines
    assert LINE.fullmatch(line).group(1, 2) == ("packages", "1")
    assert set(data.validation.domains) >= {"docstrings", "readme"}
    with pytest.raises(ValueError, match="takes a CorpusConfig"):
        prepare_run_data(tmp_path / "other", corpus_config=PackageCorpusConfig())
    with pytest.raises(ValueError, match="unknown built-in corpus 'builtin:pakages'"):
        prepare_run_data(tmp_path / "other", data="builtin:pakages")


def test_user_text_prints_no_corpus_line(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of some text\n" for i in range(200)), encoding="utf-8")
    lines = []
    prepare_run_data(tmp_path / "run", data=text, vocab_size=300, log=lines.append)
    assert lines == [] and not (tmp_path / "run" / "data" / "corpus.json").exists()
