"""Documents: the unit of text the data layer works with, user text loading, splitting.

A document is one piece of text with a domain tag and a stable id. The train/validation
split is made per document (never inside one), so no text is shared between the splits.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document: its text, the domain it belongs to, and an id unique in its corpus."""

    id: str
    domain: str
    text: str


def load_documents(path: str | Path, *, default_domain: str = "text") -> list[Document]:
    """Read user documents from a .txt file, a .jsonl file, or a folder of them.

    A .txt file is one document. A .jsonl file holds one JSON object per line with a
    `text` field and an optional `domain` field. A folder is searched recursively and
    its files are read in sorted path order, so the result does not depend on the
    file system's listing order.

    Args:
        path: a .txt file, a .jsonl file, or a folder containing them.
        default_domain: domain of documents that do not name one.

    Returns:
        The documents in file order (then line order within a .jsonl file). Ids are the
        file path relative to `path` (its name for a single file), plus `:LINE` for .jsonl.

    Raises:
        ValueError: the path is missing, has an unknown suffix, or holds no text; a file
            is not UTF-8 (the message gives the byte offset); a .jsonl line is not an
            object with a string `text` (the message gives the line number).
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"path {str(root)!r} does not exist")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(root)!r} contains no .txt or .jsonl files")
        names = [f.relative_to(root).as_posix() for f in files]
    else:
        if root.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"file {str(root)!r} must end in .txt or .jsonl, got {root.suffix!r}")
        files, names = [root], [root.name]
    documents: list[Document] = []
    for file, name in zip(files, names, strict=True):
        documents.extend(_read_file(file, name, default_domain))
    return documents


def _read_file(file: Path, name: str, default_domain: str) -> list[Document]:
    """Read one .txt or .jsonl file into documents (see load_documents)."""
    text = _read_utf8(file)
    if not text.strip():
        raise ValueError(f"file {str(file)!r} is empty")
    if file.suffix == ".txt":
        return [Document(id=name, domain=default_domain, text=text)]
    documents = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            documents.append(_parse_jsonl_line(file, name, line_number, line, default_domain))
    return documents


def _read_utf8(file: Path) -> str:
    """Decode a file as UTF-8, naming the file and the first bad byte offset on failure."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"file {str(file)!r} is not valid UTF-8: byte 0x{data[error.start]:02x} "
            f"at byte offset {error.start}"
        ) from None


def _parse_jsonl_line(
    file: Path, name: str, line_number: int, line: str, default_domain: str
) -> Document:
    """Turn one .jsonl line into a document; errors name the file and the line number."""
    where = f"{str(file)!r} line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error.msg}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where} must be a JSON object with a string 'text' field")
    domain = record.get("domain", default_domain)
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"{where} has 'domain' {domain!r}; it must be a non-empty string")
    return Document(id=f"{name}:{line_number}", domain=domain, text=record["text"])


def split_documents(
    documents: list[Document], *, validation_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation sets, per domain, by a hash of the id.

    In each domain the ceil(fraction * n) documents with the smallest SHA-256 of their
    id go to validation, so every domain with documents gets at least one validation
    document when the fraction is above zero, and the split depends only on the ids.

    Args:
        documents: documents with unique ids.
        validation_fraction: share of each domain's documents held out, in [0, 1).

    Returns:
        (train, validation), each in the order the documents came in.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction ({validation_fraction}) must be in [0, 1)")
    by_domain: dict[str, list[Document]] = {}
    for document in documents:
        by_domain.setdefault(document.domain, []).append(document)
    validation_ids: set[str] = set()
    for domain_documents in by_domain.values():
        num_validation = math.ceil(validation_fraction * len(domain_documents))
        ranked = sorted(domain_documents, key=lambda d: _id_hash(d.id))
        validation_ids.update(d.id for d in ranked[:num_validation])
    train = [d for d in documents if d.id not in validation_ids]
    validation = [d for d in documents if d.id in validation_ids]
    return train, validation


def _id_hash(document_id: str) -> str:
    return hashlib.sha256(document_id.encode("utf-8")).hexdigest()
