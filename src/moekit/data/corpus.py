"""The embedded default corpus: five domains built offline from what every machine holds.

Only Python's standard library and moekit's own dependency chatterbot-corpus are read:
no download, no operating-system file, no optional extra. Version 2 holds enough unique
text that a run sees no token twice within twice the default budget (2 x 225 steps x
48 x 128 = 2.76 M tokens).

Domains and their sources (CPython 3.11.7, default config; docs/data.md has the table):
- code: the 407 standard-library modules of stdlib_modules.py (every plain .py file of
  CPython 3.10-3.13 less test suites and data tables) with their docstrings cut out,
  split into documents at top-level `def`/`class` boundaries (6.27 M chars, 863 documents).
- prose: CPython's help topics (`pydoc_data.topics`, one document per topic), then the
  docstrings cut out of those modules, written as help() shows them and joined into
  documents of about 6000 characters (2.29 M chars, 600 documents). Docstrings move from
  code to prose, they are not copied, so the two domains share no text.
- math: 10 000 distinct generated arithmetic and algebra problems with worked solutions,
  one document per problem (1.61 M chars; see math_problems.py).
- dialogue: the English conversations of the chatterbot-corpus package, one document
  per YAML file (0.22 M chars, 21 documents).
- multilingual: the same package's 27 other languages (0.51 M chars, 216 documents).
Total 10.9 M characters: 3.39 M training and 0.16 M validation tokens with the default
4096-token tokenizer trained on the training split.

The build is deterministic: sources are read in a fixed order, a document whose text
came before is dropped, and the split hashes document ids. Corpus.sha256 hashes every
document in split order; Corpus.describe makes the one line a run prints. The result is
cached as JSON lines under `<cache_dir>/corpus-<CORPUS_VERSION>-<key>/` (meta.json holds
the hash), where the key hashes the config, the Python version and the chatterbot-corpus
version (the sources differ between them), so a second build only reads the cached
files. Bump CORPUS_VERSION whenever the builders change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moekit.data.docstrings import Docstring, chunk_entries, split_docstrings
from moekit.data.documents import Document, split_documents
from moekit.data.math_problems import generate_problems
from moekit.data.stdlib_modules import DEFAULT_CODE_MODULES

CORPUS_VERSION = "2"
DOMAINS = ("code", "prose", "math", "dialogue", "multilingual")


@dataclass(kw_only=True)
class CorpusConfig:
    """What goes into the default corpus. Smaller values make quick test corpora."""

    domains: tuple[str, ...] = DOMAINS
    # Standard-library files: their docstrings are prose, the rest of their source code.
    code_modules: tuple[str, ...] = DEFAULT_CODE_MODULES
    # Documents are whole top-level blocks (code) or whole docstrings (prose), joined
    # until they pass this length.
    code_chunk_chars: int = 6000
    prose_chunk_chars: int = 6000
    # None keeps every help topic / every language; a number keeps the first ones.
    max_prose_topics: int | None = None
    max_languages: int | None = None
    num_math_problems: int = 10000
    math_seed: int = 0
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        unknown = sorted(set(self.domains) - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
        for name in ("code_chunk_chars", "prose_chunk_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")

    def cache_key(self) -> str:
        """A short hash of the config and the versions of the sources."""
        import chatterbot_corpus

        versions = {
            "python": list(sys.version_info[:2]),
            "chatterbot": chatterbot_corpus.__version__,
        }
        return short_hash(dataclasses.asdict(self) | versions)


@dataclass
class Corpus:
    """Documents split into train and validation, each in a fixed order.

    name and version say which built-in corpus this is ("default" v2, "packages" v1);
    sha256 hashes every document's id, domain and text in split order (corpus_sha256).
    """

    train: list[Document]
    validation: list[Document]
    path: Path | None = field(default=None, compare=False)
    name: str = "default"
    version: str = CORPUS_VERSION
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = corpus_sha256(self.train, self.validation)

    @property
    def domains(self) -> list[str]:
        """Domains present, in DOMAINS order, then any others sorted."""
        present = {d.domain for d in self.train + self.validation}
        return [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))

    @property
    def num_chars(self) -> int:
        """Characters in both splits."""
        return sum(len(d.text) for d in self.train + self.validation)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per domain: number of documents and characters in each split."""
        table = {d: dict.fromkeys(("train_docs", "train_chars", "val_docs", "val_chars"), 0)
                 for d in self.domains}  # fmt: skip
        for split, documents in (("train", self.train), ("val", self.validation)):
            for document in documents:
                table[document.domain][f"{split}_docs"] += 1
                table[document.domain][f"{split}_chars"] += len(document.text)
        return table

    def describe(self, train_tokens: int, validation_tokens: int) -> str:
        """One line for logs: which corpus, its size in characters and tokens, its hash.

        Example: "corpus: default v2, 10.9 M chars, 3.39 M train tokens, 0.161 M
        validation tokens, sha256 538ce7aff58b".
        """
        return (
            f"corpus: {self.name} v{self.version}, {_millions(self.num_chars)} chars, "
            f"{_millions(train_tokens)} train tokens, {_millions(validation_tokens)} "
            f"validation tokens, sha256 {self.sha256[:12]}"
        )


def corpus_sha256(train: list[Document], validation: list[Document]) -> str:
    """SHA-256 of the documents (split, id, domain, text), in order: equal only for equal corpora."""
    digest = hashlib.sha256()
    for split, documents in (("train", train), ("validation", validation)):
        for d in documents:
            record = json.dumps([split, d.id, d.domain, d.text], ensure_ascii=False)
            digest.update(record.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _millions(count: int) -> str:
    return f"{count / 1e6:.3g} M"


def short_hash(fields: dict) -> str:
    """12 hex digits of the SHA-256 of fields as sorted JSON: a cache key."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """$MOEKIT_CACHE, else $XDG_CACHE_HOME/moekit, else ~/.cache/moekit."""
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moekit"


def build_corpus(cache_dir: str | Path | None = None, config: CorpusConfig | None = None) -> Corpus:
    """Build the default corpus, or read it from the cache when it was built before.

    Args:
        cache_dir: folder for cached corpora; None uses default_cache_dir().
        config: what to include; None uses CorpusConfig().

    Returns:
        The corpus, with `path` set to its cache folder.
    """
    config = config or CorpusConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"corpus-{CORPUS_VERSION}-{config.cache_key()}"

    def build() -> Corpus:
        documents = collect_documents(config)
        train, validation = split_documents(
            documents, validation_fraction=config.validation_fraction
        )
        return Corpus(train=train, validation=validation, path=folder)

    return cached_corpus(folder, build, dataclasses.asdict(config))


def cached_corpus(folder: Path, build: Callable[[], Corpus], config: dict) -> Corpus:
    """Read the corpus cached in folder, or build it and cache it there.

    Args:
        folder: the cache folder of this corpus, name, version and config.
        build: makes the corpus (with `path` set to folder) when the cache has none.
        config: recorded in meta.json with the corpus's name, version, hash and stats.

    Returns:
        The corpus.
    """
    if (folder / "meta.json").exists():
        return _read_cache(folder)
    corpus = build()
    _write_cache(corpus, folder, config)
    return corpus


def collect_documents(config: CorpusConfig) -> list[Document]:
    """Read every selected source, in DOMAINS order, into tagged documents."""
    wanted = set(config.domains)
    # Code and prose both come from the same parsed files.
    modules = read_stdlib_modules(config.code_modules) if wanted & {"code", "prose"} else []
    builders = {
        "code": lambda: code_documents(modules, config.code_chunk_chars),
        "prose": lambda: prose_documents(
            modules, config.max_prose_topics, config.prose_chunk_chars
        ),
        "math": lambda: math_documents(config.num_math_problems, config.math_seed),
        "dialogue": lambda: dialogue_documents(english=True),
        "multilingual": lambda: dialogue_documents(
            english=False, max_languages=config.max_languages
        ),
    }
    documents: list[Document] = []
    for domain in DOMAINS:
        if domain in wanted:
            documents.extend(builders[domain]())
    return unique_texts(documents)


def unique_texts(documents: list[Document]) -> list[Document]:
    """The documents less any whose text came before, so no text is in both splits.

    In the default corpus two help topics ("if", "else") are one text, and two package
    __init__ files hold the same comment.
    """
    seen: set[str] = set()
    unique = []
    for document in documents:
        if document.text not in seen:
            seen.add(document.text)
            unique.append(document)
    return unique


@dataclass
class StdlibModule:
    """One standard-library file, split: its code without docstrings, and the docstrings.

    kept: texts of docstrings that share a line with code and so stay in `code`.
    """

    path: str
    code: str
    docstrings: list[Docstring]
    kept: list[str]


def read_stdlib_modules(paths: tuple[str, ...]) -> list[StdlibModule]:
    """Read and split the given standard-library files; files this Python lacks are skipped.

    Args:
        paths: paths under the standard library, e.g. "json/decoder.py".

    Returns:
        The modules, in the order given.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in paths:
        file = stdlib / path
        if not file.is_file():
            continue
        dotted = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        code, docstrings, kept = split_docstrings(file.read_text(encoding="utf-8"), dotted)
        modules.append(StdlibModule(path, code, docstrings, kept))
    return modules


def code_documents(modules: list[StdlibModule], chunk_chars: int) -> list[Document]:
    """Standard-library source without docstrings, cut into documents at top-level blocks."""
    documents = []
    for module in modules:
        chunks = [c for c in _split_source(module.code, chunk_chars) if c.strip()]
        for index, chunk in enumerate(chunks):
            documents.append(Document(id=f"code/{module.path}#{index}", domain="code", text=chunk))
    return documents


def _split_source(source: str, chunk_chars: int) -> list[str]:
    """Cut source into chunks of whole top-level blocks, each just past chunk_chars."""
    lines = source.splitlines(keepends=True)
    chunks, current, current_chars = [], [], 0
    for i, line in enumerate(lines):
        # A blank line followed by an unindented def/class/decorator starts a new block.
        starts_block = line.startswith(("def ", "class ", "async def ", "@"))
        after_blank = i > 0 and not lines[i - 1].strip()
        if starts_block and after_blank and current_chars >= chunk_chars:
            chunks.append("".join(current))
            current, current_chars = [], 0
        current.append(line)
        current_chars += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


def prose_documents(
    modules: list[StdlibModule], max_topics: int | None, chunk_chars: int
) -> list[Document]:
    """CPython's help topics, then the docstrings cut out of the standard-library modules.

    A topic is one document (the text `help('TOPIC')` shows). A module's docstrings are
    written as help() shows them (qualified name, indented text) and joined into
    documents of about chunk_chars. Left out, so that prose repeats neither itself nor
    the code: a docstring whose text came earlier or stayed in some module's code, and
    one with a line of 40+ characters that is also a line of the code (a few modules
    repeat a docstring in a string literal or show their own code in an example).

    Args:
        modules: the split standard-library modules (read_stdlib_modules).
        max_topics: keep the first help topics in sorted order (None keeps all).
        chunk_chars: docstring documents are joined until they pass this length.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)[:max_topics]
    documents = [
        Document(id=f"prose/topics/{name}", domain="prose", text=topics[name]) for name in names
    ]
    seen = {text for module in modules for text in module.kept}
    code_lines = set().union(*(long_lines(module.code) for module in modules))
    for module in modules:
        entries = []
        for docstring in module.docstrings:
            if docstring.text in seen or not code_lines.isdisjoint(long_lines(docstring.text)):
                continue
            seen.add(docstring.text)
            entries.append(docstring.entry())
        for index, chunk in enumerate(chunk_entries(entries, chunk_chars)):
            documents.append(
                Document(id=f"prose/docstrings/{module.path}#{index}", domain="prose", text=chunk)
            )
    return documents


def long_lines(text: str, min_chars: int = 40) -> set[str]:
    """The lines of text with at least min_chars characters, stripped of outer whitespace.

    Two texts that share such a line share text, whatever their indentation; shorter
    lines ("Returns:", "pass") are common to unrelated texts.
    """
    return {stripped for line in text.split("\n") if len(stripped := line.strip()) >= min_chars}


def math_documents(num_problems: int, seed: int) -> list[Document]:
    """Generated problems with worked solutions, one document per distinct problem.

    A few templates have few distinct problems (percentages of round numbers), so the
    generator repeats some; repeats are skipped and the stream drawn further until
    num_problems distinct problems are in (generate_problems(n) is a prefix of
    generate_problems(2 * n)).
    """
    texts: dict[str, None] = {}  # insertion-ordered set
    drawn = num_problems
    while len(texts) < num_problems:
        texts = dict.fromkeys(p.text() for p in generate_problems(drawn, seed=seed))
        drawn *= 2
    return [
        Document(id=f"math/{i:06d}", domain="math", text=text)
        for i, text in enumerate(list(texts)[:num_problems])
    ]


def dialogue_documents(*, english: bool, max_languages: int | None = None) -> list[Document]:
    """chatterbot-corpus conversations: English ones, or every other language.

    One document per YAML file (a topic in one language). Each conversation is written as
    alternating `A:` / `B:` lines, with a blank line between conversations.

    Args:
        english: True for the English files (domain "dialogue"), False for all others
            (domain "multilingual").
        max_languages: keep only the first languages in sorted order (None keeps all).
    """
    import chatterbot_corpus

    data = Path(chatterbot_corpus.__file__).parent / "data"
    if english:
        languages = ["english"]
    else:
        others = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name != "english")
        languages = others[:max_languages]
    domain = "dialogue" if english else "multilingual"
    documents = []
    for language in languages:
        for file in sorted((data / language).glob("*.yml")):
            text = _conversations_text(_load_yaml(file))
            if text:
                documents.append(
                    Document(id=f"{domain}/{language}/{file.stem}", domain=domain, text=text)
                )
    return documents


def _load_yaml(file: Path) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster
    with open(file, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader) or {}


def _conversations_text(record: dict) -> str:
    """Write a chatterbot YAML record's conversations as A:/B: turns."""
    blocks = []
    for conversation in record.get("conversations") or []:
        # A few entries in the package are one string instead of a list of turns.
        turns = conversation if isinstance(conversation, list) else [conversation]
        lines = [f"{'AB'[i % 2]}: {str(turn).strip()}" for i, turn in enumerate(turns)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _write_cache(corpus: Corpus, folder: Path, config: dict) -> None:
    """Write documents and metadata; meta.json goes last so a half-written cache is ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, documents in (("train", corpus.train), ("validation", corpus.validation)):
        temporary = folder / f"{split}.jsonl.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            for d in documents:
                record = {"id": d.id, "domain": d.domain, "text": d.text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        temporary.replace(folder / f"{split}.jsonl")
    meta = {
        "name": corpus.name,
        "version": corpus.version,
        "sha256": corpus.sha256,
        "config": config,
        "stats": corpus.stats(),
    }
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (folder / "meta.json.tmp").replace(folder / "meta.json")


def _read_cache(folder: Path) -> Corpus:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    splits = []
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", encoding="utf-8") as handle:
            splits.append([Document(**json.loads(line)) for line in handle])
    return Corpus(
        train=splits[0],
        validation=splits[1],
        path=folder,
        name=meta["name"],
        version=meta["version"],
        sha256=meta["sha256"],
    )
