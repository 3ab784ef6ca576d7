"""The held-out corpus: installed packages' docstrings and descriptions, never the stdlib's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

import moekit.data.package_corpus as package_module
from moekit.data import (
    PACKAGE_CORPUS_VERSION,
    CorpusConfig,
    PackageCorpusConfig,
    build_builtin_corpus,
    build_corpus,
    build_package_corpus,
    builtin_corpus_name,
)
from moekit.data.package_corpus import installed_packages

# moekit's own dependencies, so installed wherever moekit is.
SMALL = PackageCorpusConfig(packages=("jinja2", "tqdm", "PyYAML"), max_docstring_chars=40_000)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache holding the full default corpus (built once), which the builds leave out."""
    folder = tmp_path_factory.mktemp("cache")
    build_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def small_corpus(cache_dir):
    return build_package_corpus(cache_dir, SMALL)


def test_domains_packages_and_cache_key(small_corpus):
    corpus = small_corpus
    assert (corpus.name, corpus.version) == ("packages", PACKAGE_CORPUS_VERSION)
    assert corpus.domains == ["docstrings", "readme"]
    for row in corpus.stats().values():
        assert row["train_docs"] > 0 and row["val_docs"] > 0
    names = {d.id.split("/")[1].split("#")[0] for d in corpus.train + corpus.validation}
    assert names == {"jinja2", "tqdm", "pyyaml"}
    # The cache key holds each package's version: another version is another corpus.
    meta = json.loads((corpus.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["config"]["distributions"] == [
        [name, importlib.metadata.version(name)] for name in ("jinja2", "pyyaml", "tqdm")
    ]
    entry = next(d for d in corpus.train if d.id == "docstrings/jinja2#0").text
    assert entry.startswith("jinja2") and "\n    " in entry  # help() style


def test_build_is_deterministic(cache_dir, small_corpus):
    shutil.rmtree(small_corpus.path)
    again = build_package_corpus(cache_dir, SMALL)
    assert again.path == small_corpus.path
    assert again == small_corpus and again.sha256 == small_corpus.sha256


def test_reads_only_outside_the_standard_library(cache_dir, monkeypatch):
    read = []
    original = package_module._read_source
    monkeypatch.setattr(package_module, "_read_source", lambda f: read.append(f) or original(f))
    build_package_corpus(cache_dir, PackageCorpusConfig(packages=("tqdm",)))
    assert read
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    site = {Path(paths[k]).resolve() for k in ("purelib", "platlib")}
    for file in read:
        file = Path(file).resolve()
        assert file.suffix == ".py" and "tqdm" in file.parts
        in_site = any(folder in file.parents for folder in site)
        assert in_site or stdlib not in file.parents, file
        assert not {"tests", "test"} & set(file.parts[-3:]), file


def test_shares_nothing_with_the_default_corpus(cache_dir, small_corpus):
    default = build_corpus(cache_dir)
    default_texts = {d.text for d in default.train + default.validation}
    default_lines = {
        line.strip()
        for d in default.train + default.validation
        for line in d.text.splitlines()
        if len(line.strip()) >= 60
    }
    for d in small_corpus.train + small_corpus.validation:
        assert d.text not in default_texts
        shared = [line for line in d.text.splitlines() if line.strip() in default_lines]
        assert not shared, (d.id, shared[:1])


def test_every_package_but_moekit_and_the_default_corpus_source():
    names = [p.name for p in installed_packages()]
    assert names == sorted(names) and len(names) == len(set(names))
    assert "numpy" in names and "torch" in names
    assert "moekit" not in names and "chatterbot-corpus" not in names


def test_unknown_package_and_corpus_names_are_errors():
    with pytest.raises(ValueError, match="not-a-package"):
        installed_packages(("not-a-package",))
    with pytest.raises(ValueError, match="builtin:nope.*builtin:default, builtin:packages"):
        builtin_corpus_name("builtin:nope")
    with pytest.raises(ValueError, match="PackageCorpusConfig, got a CorpusConfig"):
        build_builtin_corpus("packages", CorpusConfig())
    with pytest.raises(ValueError, match="poetry"):
        PackageCorpusConfig(domains=("poetry",))
    assert builtin_corpus_name(None) == "default"
    assert builtin_corpus_name("builtin:packages") == "packages"
    assert builtin_corpus_name(os.path.join("texts", "a.txt")) is None
