"""Token streams: documents as one flat array of token ids, in memory or on disk.

Legend: N tokens in the stream.

A stream is `tokens_N` (uint16 when the vocabulary fits, else uint32) with the
end-of-document token after every document, and `domain_ids_N` (uint8): the domain of
the document each token came from, kept for routing analysis (which experts serve which
domain). `prepare` writes a stream to disk in chunks, so corpora larger than memory can
be tokenised once and then read through numpy memmap by `load_stream`.

On disk, `NAME.bin` holds the tokens, `NAME.domains.bin` the domain ids, and `NAME.json`
the metadata (dtype, token count, vocabulary size, tokenizer hash, domain names).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from moekit.data.corpus import DOMAINS
from moekit.data.documents import Document
from moekit.data.tokenizer import Tokenizer

STREAM_FORMAT = 1
DOMAIN_DTYPE = np.uint8


@dataclass
class TokenStream:
    """Tokens, their domain ids, and the names the domain ids index into."""

    tokens_N: np.ndarray
    domain_ids_N: np.ndarray
    domains: tuple[str, ...]
    eot_id: int

    def __len__(self) -> int:
        return len(self.tokens_N)

    def __post_init__(self) -> None:
        assert self.tokens_N.shape == self.domain_ids_N.shape, "one domain id per token"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def stream_domains(documents: Iterable[Document]) -> tuple[str, ...]:
    """Domain names for a stream: the default corpus's, then any others sorted."""
    present = {d.domain for d in documents}
    return DOMAINS + tuple(sorted(present - set(DOMAINS)))


def _encode_chunk(
    documents: list[Document], tokenizer: Tokenizer, domain_index: dict[str, int], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and domain ids of a few documents, each followed by the end-of-document id
    (and preceded by the bos id when the tokenizer adds one: Tokenizer.document_ids)."""
    unknown = {d.domain for d in documents} - set(domain_index)
    if unknown:
        raise ValueError(f"documents have domains {sorted(unknown)} not in {list(domain_index)}")
    ids_per_document = tokenizer.encode_batch([d.text for d in documents])
    tokens, domain_ids = [], []
    for document, ids in zip(documents, ids_per_document, strict=True):
        ids = tokenizer.document_ids(ids)
        tokens.append(np.asarray(ids, dtype=dtype))
        domain_ids.append(np.full(len(ids), domain_index[document.domain], dtype=DOMAIN_DTYPE))
    if not tokens:
        return np.empty(0, dtype), np.empty(0, DOMAIN_DTYPE)
    return np.concatenate(tokens), np.concatenate(domain_ids)


def tokenize_documents(
    documents: list[Document], tokenizer: Tokenizer, *, domains: tuple[str, ...] | None = None
) -> TokenStream:
    """Tokenise documents into one in-memory stream.

    Args:
        documents: documents in stream order.
        tokenizer: the tokenizer; its end-of-document id follows every document.
        domains: names for the domain ids; None uses stream_domains(documents).

    Returns:
        A TokenStream with N = sum over documents of (tokens + 1), + 1 more per document
        when the tokenizer starts text with a bos token.
    """
    domains = domains if domains is not None else stream_domains(documents)
    dtype = token_dtype(tokenizer.vocab_size)
    domain_index = {name: i for i, name in enumerate(domains)}
    tokens_N, domain_ids_N = _encode_chunk(documents, tokenizer, domain_index, dtype)
    return TokenStream(tokens_N, domain_ids_N, tuple(domains), tokenizer.eot_id)


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while chunk := list(islice(iterator, size)):
        yield chunk


def prepare(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    domains: tuple[str, ...] | None = None,
    documents_per_chunk: int = 512,
) -> Path:
    """Tokenise documents into `path` (.bin), its domain ids and a JSON sidecar.

    Documents are read and written `documents_per_chunk` at a time, so `documents` can be
    a generator over a corpus larger than memory.

    Args:
        documents: documents in stream order (any iterable, read once).
        tokenizer: the tokenizer; its hash goes into the sidecar.
        path: the token file to write, e.g. "data/train.bin".
        domains: names for the domain ids; None uses DOMAINS plus, for a list of documents,
            any other domains it holds (a generator must only use DOMAINS, or pass them).
        documents_per_chunk: documents tokenised per batch.

    Returns:
        The path of the token file.
    """
    path = Path(path)
    if path.suffix != ".bin":
        raise ValueError(f"stream path {str(path)!r} must end in .bin")
    if domains is None:
        domains = stream_domains(documents) if isinstance(documents, list) else DOMAINS
    if len(domains) > np.iinfo(DOMAIN_DTYPE).max + 1:
        raise ValueError(f"{len(domains)} domains do not fit in {np.dtype(DOMAIN_DTYPE).name}")
    dtype = token_dtype(tokenizer.vocab_size)
    domain_index = {name: i for i, name in enumerate(domains)}
    path.parent.mkdir(parents=True, exist_ok=True)
    num_tokens = num_documents = 0
    with open(path, "wb") as token_file, open(_domains_path(path), "wb") as domain_file:
        for chunk in _chunks(documents, documents_per_chunk):
            tokens_n, domain_ids_n = _encode_chunk(chunk, tokenizer, domain_index, dtype)
            token_file.write(tokens_n.tobytes())
            domain_file.write(domain_ids_n.tobytes())
            num_tokens += len(tokens_n)
            num_documents += len(chunk)
    meta = {
        "format": STREAM_FORMAT,
        "dtype": dtype.name,
        "domain_dtype": np.dtype(DOMAIN_DTYPE).name,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokenizer_sha256": tokenizer.sha256(),
        "domains": list(domains),
    }
    _meta_path(path).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def read_stream_meta(path: str | Path) -> dict:
    """The JSON sidecar of a prepared stream."""
    meta_path = _meta_path(Path(path))
    if not meta_path.is_file():
        raise ValueError(
            f"no stream metadata at {str(meta_path)!r}; was {str(path)!r} made by prepare()?"
        )
    return json.loads(meta_path.read_text(encoding="utf-8"))


def load_stream(path: str | Path, *, tokenizer: Tokenizer | None = None) -> TokenStream:
    """Open a prepared stream through numpy memmap (nothing is read until it is indexed).

    Args:
        path: the .bin file written by prepare().
        tokenizer: if given, the stream must have been made with this exact tokenizer.

    Returns:
        A TokenStream whose arrays are read-only memmaps.
    """
    path = Path(path)
    meta = read_stream_meta(path)
    if meta["format"] != STREAM_FORMAT:
        raise ValueError(
            f"{str(path)!r} has stream format {meta['format']}, expected {STREAM_FORMAT}"
        )
    if tokenizer is not None and tokenizer.sha256() != meta["tokenizer_sha256"]:
        raise ValueError(
            f"{str(path)!r} was made with tokenizer {meta['tokenizer_sha256'][:12]}, "
            f"not the given tokenizer {tokenizer.sha256()[:12]}"
        )
    num_tokens = meta["num_tokens"]
    if num_tokens == 0:
        raise ValueError(f"stream {str(path)!r} is empty")
    tokens_N = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(num_tokens,))
    domain_ids_N = np.memmap(
        _domains_path(path), dtype=meta["domain_dtype"], mode="r", shape=(num_tokens,)
    )
    return TokenStream(tokens_N, domain_ids_N, tuple(meta["domains"]), meta["eot_id"])


def _domains_path(path: Path) -> Path:
    return path.with_suffix(".domains.bin")


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")
