"""The special ids of a tokenizer: end of document (or sequence), beginning, padding.

moekit's own tokenizer (`train_tokenizer`) ends every document with `<|endoftext|>` and
pads with `<|pad|>`. A tokenizer that comes with a Hugging Face checkpoint names its own,
in the checkpoint's files:

    tokenizer_config.json    eos_token, bos_token, pad_token (a string, or a dict with
                             "content"), add_bos_token
    special_tokens_map.json  the same three names (older transformers versions)
    config.json              eos_token_id (an id or a list), bos_token_id, pad_token_id
    generation_config.json   the same ids; eos_token_id often lists every id that ends
                             a reply

`read_hf_special_tokens` gathers them, `moekit convert` records them beside the run's
tokenizer.json as `special_tokens.json` (`save_special_tokens`), and `Tokenizer.load`
reads that file back. A folder without it is read as follows: its Hugging Face files
when it has any (a Hugging Face model folder), else moekit's own tokens (a run trained
here, or converted before the file existed).

How the ids are chosen:
- eos_ids: the tokenizer's eos_token first, then the ids of config.json and then of
  generation_config.json, without repeats. The first is the document separator that
  training streams put after every document; generation stops at any of them.
- bos_id: the tokenizer's bos_token, else bos_token_id of config.json, then of
  generation_config.json. None when none names one.
- pad_id: the tokenizer's pad_token, else pad_token_id of config.json, then of
  generation_config.json. None when none names one (padding then uses the document
  separator; see Tokenizer.pad_id).
- Files that name no eos (or no pad) fall back to moekit's own <|endoftext|> (or
  <|pad|>) when the tokenizer holds it: a model folder written by moekit before it
  recorded them.
- add_bos: whether encoded text starts with bos_id, as transformers' tokenizer does:
  add_bos_token of tokenizer_config.json when it says, else what tokenizer.json's own
  post-processor adds (no post-processor adds nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS_FILE = "special_tokens.json"
SPECIAL_TOKENS_FORMAT = 1
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
HF_MODEL_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_FILES = (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS_MAP, HF_MODEL_CONFIG, HF_GENERATION_CONFIG)
# moekit's own tokens (train_tokenizer): ids 0 and 1 of every tokenizer trained here.
END_OF_DOCUMENT = "<|endoftext|>"
PADDING = "<|pad|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The special ids of one tokenizer, and where they were looked for.

    eos_ids: end-of-document / end-of-sequence ids; the first is the document separator.
    bos_id, pad_id: None when the tokenizer has none.
    add_bos: encoded text (a prompt, a document) starts with bos_id.
    source: the file(s) they were read from, for error messages.
    origin: the files they were first read from (what a copy's special_tokens.json keeps).
    """

    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    source: str = field(default="moekit's own special tokens", compare=False)
    origin: str = field(default="", compare=False)


def moekit_special_tokens(backend: HFTokenizer, source: str) -> SpecialTokens:
    """moekit's convention: <|endoftext|> ends documents, <|pad|> pads, no bos."""
    eos, pad = backend.token_to_id(END_OF_DOCUMENT), backend.token_to_id(PADDING)
    return SpecialTokens(eos_ids=() if eos is None else (eos,), pad_id=pad, source=source)


def has_hf_files(folder: str | Path) -> bool:
    """True when folder holds a Hugging Face tokenizer or model config (not a moekit run)."""
    folder = Path(folder)
    tokenizer_files = (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS_MAP, HF_GENERATION_CONFIG)
    if any((folder / name).is_file() for name in tokenizer_files):
        return True
    config = _read_json(folder / HF_MODEL_CONFIG)
    return "model_type" in config and "format" not in config


def read_hf_special_tokens(folder: str | Path, backend: HFTokenizer) -> SpecialTokens:
    """The special ids the Hugging Face files in folder name (see the module docstring).

    Args:
        folder: a Hugging Face model folder (with tokenizer.json and any of HF_FILES).
        backend: its tokenizer, to turn token names into ids.
    Raises:
        ValueError: a file that is not JSON, a value of the wrong type, or a token name the
            tokenizer does not hold, naming the file and the value.
    """
    folder = Path(folder)
    tokenizer_config = _read_json(folder / HF_TOKENIZER_CONFIG)
    tokens_map = _read_json(folder / HF_SPECIAL_TOKENS_MAP)
    model_config = _read_json(folder / HF_MODEL_CONFIG)
    if "format" in model_config and "model" in model_config:
        model_config = {}  # a moekit run's config.json names no token ids
    generation = _read_json(folder / HF_GENERATION_CONFIG)
    id_sources = ((model_config, HF_MODEL_CONFIG), (generation, HF_GENERATION_CONFIG))

    def named(key: str) -> list[int]:
        for data, name in (
            (tokenizer_config, HF_TOKENIZER_CONFIG),
            (tokens_map, HF_SPECIAL_TOKENS_MAP),
        ):
            token = _token_name(data.get(key), folder / name, key)
            if token is not None:
                token_id = backend.token_to_id(token)
                if token_id is None:
                    raise ValueError(
                        f"{str(folder / name)!r} names {key} {token!r}, which the tokenizer "
                        "(tokenizer.json) does not hold"
                    )
                return [token_id]
        return []

    def ids(key: str) -> list[int]:
        found = []
        for data, name in id_sources:
            found += _id_list(data.get(key), folder / name, key, backend)
        return found

    # Files that name none: moekit's own tokens, when the tokenizer holds them.
    ours = moekit_special_tokens(backend, "")
    eos_ids = tuple(dict.fromkeys(named("eos_token") + ids("eos_token_id"))) or ours.eos_ids
    bos = (named("bos_token") + ids("bos_token_id") + [None])[0]
    pad = (named("pad_token") + ids("pad_token_id") + [ours.pad_id])[0]
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(
            f"{str(folder / HF_TOKENIZER_CONFIG)!r}: add_bos_token must be true or false, "
            f"not {add_bos!r}"
        )
    if add_bos is None:
        add_bos = bos is not None and _post_processor_adds(backend, bos)
    present = [name for name in HF_FILES if (folder / name).is_file()]
    return SpecialTokens(
        eos_ids=eos_ids,
        bos_id=bos,
        pad_id=pad,
        add_bos=bool(add_bos) and bos is not None,
        source=f"{', '.join(present) or 'no Hugging Face files'} in {str(folder)!r}",
    )


def _post_processor_adds(backend: HFTokenizer, bos_id: int) -> bool:
    """True when tokenizer.json's post-processor puts bos_id before encoded text."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id and plain[:1] != [bos_id]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds {type(data).__name__}, not a JSON object")
    return data


def _token_name(value, path: Path, key: str) -> str | None:
    """A token named as a string or as {"content": ...} (transformers' AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError(f"{str(path)!r}: {key} must be a string or {{'content': ...}}, not {value!r}")


def _id_list(value, path: Path, key: str, backend: HFTokenizer) -> list[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    size = backend.get_vocab_size(with_added_tokens=True)
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < size:
            raise ValueError(
                f"{str(path)!r}: {key} {value!r} is not an id of the tokenizer (ids 0..{size - 1})"
            )
    return list(values)


def save_special_tokens(
    special: SpecialTokens, backend: HFTokenizer, directory: str | Path
) -> Path:
    """Write directory/special_tokens.json atomically (ids, and their tokens for reading)."""

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else backend.id_to_token(token_id)

    data = {
        "format": SPECIAL_TOKENS_FORMAT,
        "eos_token_ids": list(special.eos_ids),
        "eos_tokens": [token(i) for i in special.eos_ids],
        "bos_token_id": special.bos_id,
        "bos_token": token(special.bos_id),
        "pad_token_id": special.pad_id,
        "pad_token": token(special.pad_id),
        "add_bos_token": special.add_bos,
        "read_from": special.origin or special.source,
    }
    path = Path(directory) / SPECIAL_TOKENS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_special_tokens(path: str | Path, backend: HFTokenizer) -> SpecialTokens:
    """Read special_tokens.json (written by save_special_tokens) for backend's tokenizer."""
    path = Path(path)
    data = _read_json(path)
    if data.get("format") != SPECIAL_TOKENS_FORMAT:
        raise ValueError(
            f"{str(path)!r} has format {data.get('format')!r}, expected {SPECIAL_TOKENS_FORMAT}"
        )
    eos_ids = _id_list(data.get("eos_token_ids"), path, "eos_token_ids", backend)
    bos = _id_list(data.get("bos_token_id"), path, "bos_token_id", backend)
    pad = _id_list(data.get("pad_token_id"), path, "pad_token_id", backend)
    add_bos = data.get("add_bos_token", False)
    if not isinstance(add_bos, bool) or (add_bos and not bos):
        raise ValueError(f"{str(path)!r}: add_bos_token {add_bos!r} needs a bos_token_id")
    return SpecialTokens(
        eos_ids=tuple(eos_ids),
        bos_id=(bos + [None])[0],
        pad_id=(pad + [None])[0],
        add_bos=add_bos,
        source=f"{str(path)!r} (recorded from {data.get('read_from', 'unknown files')})",
        origin=str(data.get("read_from", "")),
    )
