"""Byte-level BPE tokenizer: trained offline with Hugging Face `tokenizers`, saved as JSON.

Byte-level means every string (any language, any bytes of UTF-8) encodes without an
unknown token and decodes back to exactly the same string, because the base alphabet is
the 256 byte values and there is no normaliser.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moekit.data.special_tokens import (
    END_OF_DOCUMENT,
    PADDING,
    SPECIAL_TOKENS_FILE,
    SpecialTokens,
    has_hf_files,
    load_special_tokens,
    moekit_special_tokens,
    read_hf_special_tokens,
    save_special_tokens,
)

SPECIAL_TOKENS = (END_OF_DOCUMENT, PADDING)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A small wrapper around a `tokenizers.Tokenizer` and its special ids.

    Args:
        backend: the `tokenizers.Tokenizer`.
        special: its special ids (data/special_tokens.py); None = moekit's own tokens,
            <|endoftext|> and <|pad|>, as far as backend holds them.

    A tokenizer may lack an end-of-document token or a pad token; `eot_id` then raises
    a ValueError naming what is missing and where it was looked for, when (and only when)
    a command needs it.
    """

    def __init__(self, backend: HFTokenizer, special: SpecialTokens | None = None):
        # Text that spells a special token (a document about tokenizers, say) is encoded
        # as plain text, so END_OF_DOCUMENT in a stream only ever marks a document's end.
        backend.encode_special_tokens = True
        self.backend = backend
        self.special = special or moekit_special_tokens(backend, "moekit's own tokens")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (generation stops at any); the first is eot_id."""
        return self.special.eos_ids

    @property
    def eot_id(self) -> int:
        """The document separator: after every document in a token stream, and the end of
        a generated text. The first of eos_ids.

        Raises:
            ValueError: the tokenizer has none, naming where it was looked for.
        """
        if not self.special.eos_ids:
            raise ValueError(
                "the tokenizer has no end-of-document token (an eos_token, or moekit's "
                f"{END_OF_DOCUMENT!r}), which token streams need between documents and "
                f"generation as its end; looked in {self.special.source}"
            )
        return self.special.eos_ids[0]

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or None when the tokenizer has none."""
        return self.special.bos_id

    @property
    def add_bos(self) -> bool:
        """Whether encoded prompts and documents start with bos_id (as transformers'
        tokenizer adds it: see data/special_tokens.py)."""
        return self.special.add_bos

    @property
    def pad_id(self) -> int:
        """The id written at padding (padding is never attended to or trained on).

        The tokenizer's pad token when it has one; otherwise the document separator
        (eot_id), the usual choice for tokenizers without a pad token (Llama's, say).
        """
        if self.special.pad_id is not None:
            return self.special.pad_id
        return self.eot_id

    @property
    def eos_token(self) -> str:
        """The text of the document separator (what a chat template ends a turn with)."""
        return self.backend.id_to_token(self.eot_id)

    def token(self, token_id: int | None) -> str | None:
        """The text of one token id (None for None)."""
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document token is added)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (the backend runs them in parallel)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as the model expects it: bos first when add_bos (as
        transformers' tokenizer(text) gives them). "" is a new document: [bos_id] with
        add_bos, else [eot_id] (the separator a new document follows in training)."""
        ids = self.encode(text) if text else []
        if self.add_bos:
            return [self.bos_id, *ids]
        return ids or [self.eot_id]

    def document_ids(self, ids: list[int]) -> list[int]:
        """A document's ids as a training stream holds them: bos first when add_bos, and
        the document separator (eot_id) last."""
        return [self.bos_id, *ids, self.eot_id] if self.add_bos else [*ids, self.eot_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special tokens are kept so that streams decode faithfully."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def sha256(self) -> str:
        """Hash of the serialised tokenizer: two tokenizers with equal hashes encode alike."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` into `directory` (created if needed) and return its path.

        A tokenizer whose special ids are not moekit's own also gets
        `special_tokens.json` beside it, so that `load` finds them again.
        """
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        if self.special != moekit_special_tokens(self.backend, ""):
            save_special_tokens(self.special, self.backend, path.parent)
        else:
            (path.parent / SPECIAL_TOKENS_FILE).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read `tokenizer.json` from `directory` (or from a path to the file itself),
        with its special ids: from `special_tokens.json` beside it, else from the Hugging
        Face files beside it (a model folder), else moekit's own (data/special_tokens.py)."""
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"no tokenizer file at {str(path)!r}")
        backend = HFTokenizer.from_file(str(path))
        folder = path.parent
        if (folder / SPECIAL_TOKENS_FILE).is_file():
            special = load_special_tokens(folder / SPECIAL_TOKENS_FILE, backend)
        elif has_hf_files(folder):
            special = read_hf_special_tokens(folder, backend)
        else:
            where = (
                f"{str(path)!r} (no {SPECIAL_TOKENS_FILE} beside it: a checkpoint converted "
                "before moekit recorded its special tokens? convert it again)"
            )
            special = moekit_special_tokens(backend, where)
        return cls(backend, special)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Tokenizer)
            and self.backend.to_str() == other.backend.to_str()
            and self.special == other.special
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256()[:12]})"


def copy_tokenizer(source: str | Path, directory: str | Path) -> Tokenizer:
    """Copy source's tokenizer.json (source: a folder) into directory byte for byte, with
    its special ids recorded beside it as special_tokens.json when source names them (in
    its own special_tokens.json or Hugging Face files), so that Tokenizer.load(directory)
    finds what Tokenizer.load(source) found.

    Returns:
        The tokenizer, as loaded from source.
    """
    tokenizer = Tokenizer.load(source)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source_file = Path(source) / TOKENIZER_FILE
    if source_file.resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copy2(source_file, directory / TOKENIZER_FILE)
    if (Path(source) / SPECIAL_TOKENS_FILE).is_file() or has_hf_files(source):
        save_special_tokens(tokenizer.special, tokenizer.backend, directory)
    else:
        (directory / SPECIAL_TOKENS_FILE).unlink(missing_ok=True)
    return tokenizer


TOKENIZER_HELP = (
    "a tokenizer.json, or a folder holding one (the Hugging Face folder a converted run "
    "came from, say); default: the run's own tokenizer.json"
)


def run_tokenizer(
    run_dir: str | Path, tokenizer: str | Path | None = None, *, may_build: bool = False
) -> Tokenizer | None:
    """The tokenizer every command that reads or writes a run's text uses.

    `tokenizer` (--tokenizer PATH) wins; else the run's own tokenizer.json. A run `moekit
    convert` wrote without one (config.json names "converted_from") is refused: its token
    ids belong to a tokenizer moekit does not have, and one trained here would read its
    text as noise. Nothing is written into run_dir.

    Args:
        run_dir: a run directory (its config.json gives the model's vocab_size).
        tokenizer: a tokenizer.json, or a folder holding one; None = the run's own.
        may_build: a run moekit trained that has no tokenizer.json yet gives None (its
            data source builds one: train/data.py); otherwise Tokenizer.load's error.
    Returns:
        The tokenizer, or None (may_build only).
    Raises:
        ValueError: a converted run without a tokenizer; a tokenizer whose vocabulary is
            larger than the model's (its ids would be out of range); no tokenizer file.
    """
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    if tokenizer is None and not (run_dir / TOKENIZER_FILE).is_file():
        source = config.get("converted_from")
        if source is not None:
            raise ValueError(
                f"{str(run_dir)!r} has no tokenizer (converted from {source!r} without "
                f"{TOKENIZER_FILE}); pass --tokenizer PATH (a {TOKENIZER_FILE} or the Hugging "
                "Face folder it came from)"
            )
        if may_build:
            return None
    if tokenizer is None:
        loaded = Tokenizer.load(run_dir)
    else:
        loaded = load_tokenizer_arg(tokenizer)
    vocab_size = (config.get("model") or {}).get("vocab_size")
    if vocab_size is not None:
        check_vocabulary(loaded, vocab_size, str(tokenizer or run_dir / TOKENIZER_FILE))
    return loaded


def load_tokenizer_arg(path: str | Path) -> Tokenizer:
    """Tokenizer.load of a --tokenizer PATH, its errors naming the flag."""
    try:
        return Tokenizer.load(path)
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"--tokenizer {str(path)!r}: {error}") from None


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows (ValueError)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer {where!r} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size ({vocab_size}): its ids would be out of range"
        )


def _run_config(run_dir: Path) -> dict:
    """run_dir's config.json as a dict ({} when it has none or it is not an object)."""
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


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
