"""What `moekit doctor` examines: a moekit run, a Hugging Face folder or a PEFT adapter.

Everything is read (safetensors and JSON only, never a pickle) and nothing is written: the
model is built in memory from the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer

from ..data.stream import load_stream
from ..data.tokenizer import check_vocabulary, load_tokenizer_arg
from ..interop.architectures import model_type_of
from ..interop.hf import load_hf, read_hf_config, weight_files
from ..interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..models import Transformer
from ..train.compare import comparison_runs
from ..train.rundir import is_run_dir, load_trained_model, read_run_config
from .findings import Finding

TOKENIZER_FILE = "tokenizer.json"
_MISSING = "the checkpoint does not match its config.json"


class TargetError(ValueError):
    """A target the doctor cannot read (the command prints it and exits 2)."""


@dataclass
class Adapter:
    """A PEFT adapter folder: its config, its tensors, and the base's tensor shapes."""

    config: dict
    tensors: dict[str, torch.Tensor]
    base: Path | None
    base_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    base_config: dict | None = None


@dataclass
class Target:
    """A target read into memory.

    kind: "run", "hf" or "adapter". model: the moekit Transformer (eval mode) or None when
    it could not be built (load_findings says why). encode: text -> token ids, or None
    without a tokenizer. dtype: the checkpoint's stored dtype (the routers' rounding).
    """

    path: Path
    kind: str
    architecture: str
    model: Transformer | None = None
    encode: object = None
    dtype: torch.dtype = torch.float32
    own_tokens: object = None  # a run's validation tokens, a read-only numpy memmap
    hf_config: dict | None = None
    run_config: dict | None = None
    adapter: Adapter | None = None
    load_findings: list[Finding] = field(default_factory=list)


def read_target(
    path: str | Path, base: str | Path | None = None, tokenizer: str | Path | None = None
) -> Target:
    """Read a target; TargetError (one line naming the path) when it is none of the three.
    tokenizer: a tokenizer.json (or a folder holding one) that encodes text instead of the
    target's own."""
    path = Path(path)
    if not path.exists():
        raise TargetError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise TargetError(
            f"{str(path)!r} is a file; give a moekit run, a Hugging Face model folder or a "
            "PEFT adapter folder"
        )
    try:
        if (path / ADAPTER_CONFIG).is_file():
            return _adapter(path, base)
        runs = comparison_runs(path)
        if runs is not None:
            path = runs["moe"]
        if is_run_dir(path):
            return _run(path, tokenizer)
        if (path / "config.json").is_file():
            return _hf(path, tokenizer)
    except (
        OSError,
        SafetensorError,
        json.JSONDecodeError,
        KeyError,
        RuntimeError,
        AttributeError,  # a config.json that is not an object
        TypeError,
    ) as error:
        raise TargetError(f"cannot read {str(path)!r}: {error}") from None
    raise TargetError(
        f"{str(path)!r} is not a moekit run (config.json of the run format), a Hugging Face "
        f"model folder (config.json and safetensors) or a PEFT adapter ({ADAPTER_CONFIG})"
    )


def _run(path: Path, tokenizer: str | Path | None) -> Target:
    config = read_run_config(path)
    target = Target(path, "run", "moekit", run_config=config)
    target.model = load_trained_model(path)
    target.dtype = next(target.model.parameters()).dtype
    target.encode = _tokenizer(path, tokenizer, target.model.config.vocab_size)
    val = path / "data" / "val.bin"
    if val.is_file():
        target.own_tokens = load_stream(val).tokens_N
    return target


def _hf(path: Path, tokenizer: str | Path | None) -> Target:
    hf = read_hf_config(path)
    target = Target(path, "hf", model_type_of(hf), hf_config=hf)
    weight_files(path)  # no weights at all is a bad target, not a finding
    try:
        target.model = load_hf(path)
    except ValueError as error:
        if not str(error).startswith(_MISSING):
            raise TargetError(f"cannot read {str(path)!r}: {error}") from None
        target.load_findings.append(
            Finding(
                "error",
                "weights.missing",
                f"{error}",
                "the conversion or download that wrote this folder left tensors out (or "
                "wrote others): write it again and compare the tensor names with the index",
            )
        )
        return target
    target.dtype = next(target.model.parameters()).dtype
    target.encode = _tokenizer(path, tokenizer, target.model.config.vocab_size)
    return target


def _tokenizer(folder: Path, tokenizer: str | Path | None, vocab_size: int):
    """encode(text) -> ids with --tokenizer (checked against vocab_size) or the folder's
    tokenizer.json, or None."""
    if tokenizer is not None:
        loaded = load_tokenizer_arg(tokenizer)
        check_vocabulary(loaded, vocab_size, str(tokenizer))
        backend = loaded.backend
    elif (folder / TOKENIZER_FILE).is_file():
        backend = HFTokenizer.from_file(str(folder / TOKENIZER_FILE))
    else:
        return None
    return lambda text: backend.encode(text).ids


def _adapter(path: Path, base: str | Path | None) -> Target:
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise TargetError(
            f"{str(path)!r}: only LoRA adapters are examined (peft_type "
            f"{config.get('peft_type') if isinstance(config, dict) else None!r})"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise TargetError(f"{str(path)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    base = Path(base) if base is not None else _recorded_base(config)
    adapter = Adapter(config, tensors, base)
    architecture = "unknown"
    if base is not None:
        if not (base / "config.json").is_file():
            raise TargetError(f"the base {str(base)!r} is not a Hugging Face model folder")
        adapter.base_config = read_hf_config(base)
        architecture = str(adapter.base_config.get("model_type"))
        for name, file in weight_files(base).items():
            with safe_open(file, framework="pt") as handle:
                adapter.base_shapes[name] = tuple(handle.get_slice(name).get_shape())
    return Target(path, "adapter", architecture, adapter=adapter)


def _recorded_base(config: dict) -> Path | None:
    """base_model_name_or_path when it is a folder on this machine (never a download)."""
    recorded = config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return None
