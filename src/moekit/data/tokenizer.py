"""Byte-level BPE tokenizer: trained offline with Hugging Face `tokenizers`, saved as JSON.

Byte-level means every string (any language, any bytes of UTF-8) encodes without an
unknown token and decodes back to exactly the same string, because the base alphabet is
the 256 byte values and there is no normaliser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

END_OF_DOCUMENT = "<|endoftext|>"
PADDING = "<|pad|>"
SPECIAL_TOKENS = (END_OF_DOCUMENT, PADDING)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A small wrapper around a `tokenizers.Tokenizer` with the special tokens we use."""

    def __init__(self, backend: HFTokenizer):
        for token in SPECIAL_TOKENS:
            if backend.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no special token {token!r}")
        # Text that spells a special token (a document about tokenizers, say) is encoded
        # as plain text, so END_OF_DOCUMENT in a stream only ever marks a document's end.
        backend.encode_special_tokens = True
        self.backend = backend
        self.eot_id: int = backend.token_to_id(END_OF_DOCUMENT)
        self.pad_id: int = backend.token_to_id(PADDING)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document token is added)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (the backend runs them in parallel)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special tokens are kept so that streams decode faithfully."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def sha256(self) -> str:
        """Hash of the serialised tokenizer: two tokenizers with equal hashes encode alike."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` into `directory` (created if needed) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read `tokenizer.json` from `directory` (or from a path to the file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"no tokenizer file at {str(path)!r}")
        return cls(HFTokenizer.from_file(str(path)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.backend.to_str() == other.backend.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256()[:12]})"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    The result depends only on the texts and their order. Keep vocab_size <= 65535 so
    that token streams fit in uint16.

    Args:
        texts: training texts, e.g. `[d.text for d in corpus.train]`.
        vocab_size: total vocabulary size, including the 256 bytes and special tokens.

    Returns:
        The trained tokenizer; END_OF_DOCUMENT is id 0 and PADDING id 1.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= {minimum} (bytes + special tokens)")
    backend = HFTokenizer(models.BPE())
    # No prefix space: one added on encode would come back on decode, and
    # decode(encode(text)) must give the text back unchanged.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
