"""The embedded default corpus: five domains built offline from what every machine holds.

Domains and their sources (CPython 3.11, default config; docs/data.md has the table):
- code: a fixed list of standard-library modules' source, split into documents at
  top-level `def`/`class` boundaries (1.79 MB, 210 documents).
- prose: CPython's help topics, `pydoc_data.topics`, one document per topic
  (0.46 MB, 79 documents).
- math: generated arithmetic and algebra problems with worked solutions, one document
  per problem (0.63 MB, 4000 documents; see math_problems.py).
- dialogue: the English conversations of the chatterbot-corpus package, one document
  per YAML file (0.22 MB, 21 documents).
- multilingual: the same package's 27 other languages (0.51 MB, 216 documents).

The build is deterministic: sources are read in a fixed order and the split hashes
document ids. The result is cached as JSON lines under
`<cache_dir>/corpus-<CORPUS_VERSION>-<key>/`, where the key hashes the config, the
Python version and the chatterbot-corpus version (the sources differ between them), so a
second build only reads the cached files. Sizes above are millions of characters. Bump
CORPUS_VERSION whenever the builders change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from moekit.data.documents import Document, split_documents
from moekit.data.math_problems import generate_problems

CORPUS_VERSION = "1"
DOMAINS = ("code", "prose", "math", "dialogue", "multilingual")

# Modules present, as plain files, from Python 3.10 to 3.13; a module missing on some
# other version is skipped (the cache key holds the Python version).
DEFAULT_CODE_MODULES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py",
    "codecs.py", "collections/__init__.py", "colorsys.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
    "fnmatch.py", "fractions.py", "functools.py", "glob.py", "graphlib.py", "gzip.py",
    "heapq.py", "html/parser.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "numbers.py",
    "operator.py", "os.py", "pprint.py", "queue.py", "random.py", "sched.py",
    "secrets.py", "selectors.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py",
    "typing.py", "urllib/parse.py", "uuid.py", "weakref.py",
)  # fmt: skip


@dataclass(kw_only=True)
class CorpusConfig:
    """What goes into the default corpus. Smaller values make quick test corpora."""

    domains: tuple[str, ...] = DOMAINS
    code_modules: tuple[str, ...] = DEFAULT_CODE_MODULES
    # Code documents are whole top-level blocks, joined until they pass this length.
    code_chunk_chars: int = 6000
    # None keeps every help topic / every language; a number keeps the first ones.
    max_prose_topics: int | None = None
    max_languages: int | None = None
    num_math_problems: int = 4000
    math_seed: int = 0
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        unknown = sorted(set(self.domains) - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
        if self.code_chunk_chars <= 0:
            raise ValueError(f"code_chunk_chars ({self.code_chunk_chars}) must be > 0")

    def cache_key(self) -> str:
        """A short hash of the config and the versions of the sources."""
        import chatterbot_corpus

        versions = {
            "python": list(sys.version_info[:2]),
            "chatterbot": chatterbot_corpus.__version__,
        }
        fields = dataclasses.asdict(self) | versions
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Corpus:
    """Documents split into train and validation, each in a fixed order."""

    train: list[Document]
    validation: list[Document]
    path: Path | None = field(default=None, compare=False)

    @property
    def domains(self) -> list[str]:
        """Domains present, in DOMAINS order, then any others sorted."""
        present = {d.domain for d in self.train + self.validation}
        return [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per domain: number of documents and characters in each split."""
        table = {d: dict.fromkeys(("train_docs", "train_chars", "val_docs", "val_chars"), 0)
                 for d in self.domains}  # fmt: skip
        for split, documents in (("train", self.train), ("val", self.validation)):
            for document in documents:
                table[document.domain][f"{split}_docs"] += 1
                table[document.domain][f"{split}_chars"] += len(document.text)
        return table


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
    if (folder / "meta.json").exists():
        return _read_cache(folder)
    documents = collect_documents(config)
    train, validation = split_documents(documents, validation_fraction=config.validation_fraction)
    corpus = Corpus(train=train, validation=validation, path=folder)
    _write_cache(corpus, folder, config)
    return corpus


def collect_documents(config: CorpusConfig) -> list[Document]:
    """Read every selected source, in DOMAINS order, into tagged documents."""
    builders = {
        "code": lambda: code_documents(config.code_modules, config.code_chunk_chars),
        "prose": lambda: prose_documents(config.max_prose_topics),
        "math": lambda: math_documents(config.num_math_problems, config.math_seed),
        "dialogue": lambda: dialogue_documents(english=True),
        "multilingual": lambda: dialogue_documents(
            english=False, max_languages=config.max_languages
        ),
    }
    documents: list[Document] = []
    for domain in DOMAINS:
        if domain in config.domains:
            documents.extend(builders[domain]())
    return documents


def code_documents(modules: tuple[str, ...], chunk_chars: int) -> list[Document]:
    """Standard-library source files, cut into documents at top-level definitions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for module in modules:
        file = stdlib / module
        if not file.is_file():
            continue
        source = file.read_text(encoding="utf-8")
        for index, chunk in enumerate(_split_source(source, chunk_chars)):
            documents.append(Document(id=f"code/{module}#{index}", domain="code", text=chunk))
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


def prose_documents(max_topics: int | None = None) -> list[Document]:
    """CPython's help topics (the text `help('TOPIC')` shows), one document per topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:max_topics]
    return [Document(id=f"prose/{name}", domain="prose", text=topics[name]) for name in names]


def math_documents(num_problems: int, seed: int) -> list[Document]:
    """Generated problems with worked solutions, one document per problem."""
    problems = generate_problems(num_problems, seed=seed)
    return [
        Document(id=f"math/{i:06d}", domain="math", text=p.text()) for i, p in enumerate(problems)
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


def _write_cache(corpus: Corpus, folder: Path, config: CorpusConfig) -> None:
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
        "version": CORPUS_VERSION,
        "config": dataclasses.asdict(config),
        "stats": corpus.stats(),
    }
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (folder / "meta.json.tmp").replace(folder / "meta.json")


def _read_cache(folder: Path) -> Corpus:
    splits = []
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", encoding="utf-8") as handle:
            splits.append([Document(**json.loads(line)) for line in handle])
    return Corpus(train=splits[0], validation=splits[1], path=folder)
