"""The held-out corpus: documentation of the installed third-party packages.

Text the default corpus never reads, for checking that a recipe tuned on the default
corpus generalises (`moekit train --data builtin:packages`). Two domains:
- docstrings: the module, class and function docstrings of each installed distribution's
  .py files, read with `ast` (nothing is imported), written as help() shows them.
- readme: each distribution's long description (the README that PyPI shows), from its
  METADATA through importlib.metadata.

What is read: every distribution importlib.metadata finds on sys.path (the first of
each name), in order of name, less moekit and chatterbot-corpus (the default corpus's
conversations). Files in test, vendored and example folders are skipped, and files of
a distribution are read in order of depth, then path, so a package's public modules
come before its internals. Caps per distribution keep one large package (torch) from
filling the corpus: max_docstring_chars of docstrings, max_readme_chars of description.
No file of the standard library is read (a check, since some Pythons install
site-packages inside the standard library's folder).

Nothing repeats the default corpus or itself: a docstring or description that shares a
line of 40+ characters with the default corpus is left out (typing_extensions copies
typing's docstrings, for one), and so is a docstring seen before.

The corpus differs between machines with different packages or versions installed: the
cache key holds every distribution's name and version (and the default corpus's hash),
and the size/hash line that a run prints (Corpus.describe) tells two such corpora apart.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from moekit.data.corpus import (
    Corpus,
    build_corpus,
    cached_corpus,
    default_cache_dir,
    long_lines,
    short_hash,
    unique_texts,
)
from moekit.data.docstrings import chunk_entries, module_docstrings
from moekit.data.documents import Document, split_documents

PACKAGE_CORPUS_VERSION = "1"
PACKAGE_DOMAINS = ("docstrings", "readme")
# moekit itself, and the package whose conversations are the default corpus's.
EXCLUDED_DISTRIBUTIONS = ("moekit", "chatterbot-corpus")
# Folders that hold tests, other projects' copies, examples or generated bindings.
SKIPPED_FOLDERS = frozenset(
    ("test", "tests", "testing", "_vendor", "vendor", "vendored", "_vendored", "examples")
)
# Larger .py files are generated tables or bindings, not documentation.
MAX_FILE_BYTES = 1_000_000
# Source read per distribution at most: some (moto's templates, pygments' lexers) are
# mostly data, with few docstrings per line, and parsing is what the build spends.
MAX_SOURCE_CHARS = 2_000_000


@dataclass(kw_only=True)
class PackageCorpusConfig:
    """What goes into the held-out corpus."""

    domains: tuple[str, ...] = PACKAGE_DOMAINS
    # None reads every installed distribution; names (as pip spells them) read only those.
    packages: tuple[str, ...] | None = None
    max_docstring_chars: int = 200_000
    max_readme_chars: int = 40_000
    chunk_chars: int = 6000
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        unknown = sorted(set(self.domains) - set(PACKAGE_DOMAINS))
        if unknown:
            raise ValueError(f"unknown domains {unknown}; choose from {list(PACKAGE_DOMAINS)}")
        for name in ("max_docstring_chars", "max_readme_chars", "chunk_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")


@dataclass(frozen=True)
class InstalledPackage:
    """An installed distribution: its PEP 503 name, its version, and importlib's handle."""

    name: str
    version: str
    distribution: importlib.metadata.Distribution


def build_package_corpus(
    cache_dir: str | Path | None = None, config: PackageCorpusConfig | None = None
) -> Corpus:
    """Build the held-out corpus, or read it from the cache when it was built before.

    Args:
        cache_dir: folder for cached corpora; None uses default_cache_dir(). The default
            corpus is built (or read) there too: what it holds is left out.
        config: what to include; None uses PackageCorpusConfig().

    Returns:
        The corpus ("packages"), with `path` set to its cache folder.
    """
    config = config or PackageCorpusConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    packages = installed_packages(config.packages)
    # What is left out depends on the default corpus, so its hash is part of the key.
    default = build_corpus(root)
    key_fields = dataclasses.asdict(config) | {
        "python": list(sys.version_info[:2]),
        "default_corpus": default.sha256,
        "distributions": [[p.name, p.version] for p in packages],
    }
    folder = root / f"packages-{PACKAGE_CORPUS_VERSION}-{short_hash(key_fields)}"

    def build() -> Corpus:
        taken = set().union(*(long_lines(d.text) for d in default.train + default.validation))
        documents = unique_texts(package_documents(packages, config, taken))
        train, validation = split_documents(
            documents, validation_fraction=config.validation_fraction
        )
        return Corpus(
            train=train,
            validation=validation,
            path=folder,
            name="packages",
            version=PACKAGE_CORPUS_VERSION,
        )

    return cached_corpus(folder, build, key_fields)


def installed_packages(names: tuple[str, ...] | None = None) -> list[InstalledPackage]:
    """The installed distributions the held-out corpus reads, sorted by name.

    Args:
        names: None for all of them (less EXCLUDED_DISTRIBUTIONS); else these names.

    Returns:
        One InstalledPackage per name: the distribution found first on sys.path.
    """
    found: dict[str, InstalledPackage] = {}
    for distribution in importlib.metadata.distributions():
        metadata = distribution.metadata  # parsed anew on every access
        name = _canonical(metadata["Name"] or "")
        if name and name not in found:
            found[name] = InstalledPackage(name, metadata["Version"] or "", distribution)
    if names is None:
        wanted = sorted(set(found) - {_canonical(n) for n in EXCLUDED_DISTRIBUTIONS})
    else:
        wanted = sorted({_canonical(n) for n in names})
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(f"packages {missing} are not installed")
    return [found[name] for name in wanted]


def package_documents(
    packages: list[InstalledPackage], config: PackageCorpusConfig, taken: set[str]
) -> list[Document]:
    """Docstring and readme documents of the packages, in domain order, then name order.

    Args:
        packages: from installed_packages().
        config: domains and caps.
        taken: long lines (corpus.long_lines) of text already used elsewhere; a docstring
            or description that holds one is left out.
    """
    documents = []
    if "docstrings" in config.domains:
        seen: set[str] = set()
        for package in packages:
            entries = _docstring_entries(package, config.max_docstring_chars, taken, seen)
            for index, chunk in enumerate(chunk_entries(entries, config.chunk_chars)):
                name = f"docstrings/{package.name}#{index}"
                documents.append(Document(id=name, domain="docstrings", text=chunk))
    if "readme" in config.domains:
        for package in packages:
            text = _description(package.distribution, config.max_readme_chars)
            if not text or not taken.isdisjoint(long_lines(text)):
                continue
            for index, chunk in enumerate(_paragraph_chunks(text, config.chunk_chars)):
                name = f"readme/{package.name}#{index}"
                documents.append(Document(id=name, domain="readme", text=chunk))
    return documents


def _docstring_entries(
    package: InstalledPackage, max_chars: int, taken: set[str], seen: set[str]
) -> list[str]:
    """help()-style docstring entries of one package, up to about max_chars."""
    entries, total, source_chars = [], 0, 0
    for relative, file in source_files(package.distribution):
        source = _read_source(file)
        if source is None:
            continue
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for docstring in module_docstrings(source, module):
            if docstring.text in seen or not taken.isdisjoint(long_lines(docstring.text)):
                continue
            seen.add(docstring.text)
            entries.append(docstring.entry())
            total += len(entries[-1])
            if total >= max_chars:
                return entries
        source_chars += len(source)
        if source_chars >= MAX_SOURCE_CHARS:
            break
    return entries


def source_files(distribution) -> list[tuple[str, Path]]:
    """The .py files of a distribution that the corpus may read, in reading order.

    Returns:
        (path relative to the distribution's folder, e.g. "jinja2/utils.py", absolute
        path) pairs, ordered by depth and then path; [] for a distribution installed in
        the standard library's own folder.
    """
    if is_standard_library(Path(distribution.locate_file(""))):
        return []
    files = []
    for entry in distribution.files or []:
        relative = entry.as_posix()
        parts = relative.split("/")
        # ".." leaves the distribution's folder (scripts in bin/, data files).
        if not relative.endswith(".py") or ".." in parts or SKIPPED_FOLDERS & set(parts[:-1]):
            continue
        file = Path(distribution.locate_file(entry))
        if file.is_file() and file.stat().st_size <= MAX_FILE_BYTES:
            files.append((relative, file))
    return sorted(files, key=lambda pair: (pair[0].count("/"), pair[0]))


def is_standard_library(path: Path) -> bool:
    """Whether path lies in the standard library (site-packages inside it does not count)."""
    paths = sysconfig.get_paths()
    path = path.resolve()
    stdlib = [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib")]
    packages = [Path(paths[k]).resolve() for k in ("purelib", "platlib")]
    in_stdlib = any(path.is_relative_to(folder) for folder in stdlib)
    return in_stdlib and not any(path.is_relative_to(folder) for folder in packages)


def _read_source(file: Path) -> str | None:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _description(distribution, max_chars: int) -> str:
    """The distribution's long description, cut at a paragraph break before max_chars."""
    metadata = distribution.metadata
    text = (metadata.get_payload() or metadata.get("Description") or "").strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def _paragraph_chunks(text: str, chunk_chars: int) -> list[str]:
    """Text cut at blank lines into chunks of whole paragraphs, each just past chunk_chars."""
    paragraphs = [p.strip("\n") + "\n" for p in re.split(r"\n\s*\n", text) if p.strip()]
    return chunk_entries(paragraphs, chunk_chars)


def _canonical(name: str) -> str:
    """The PEP 503 form of a distribution name: "PyYAML" and "pyyaml" are one."""
    return re.sub(r"[-_.]+", "-", name).lower()
