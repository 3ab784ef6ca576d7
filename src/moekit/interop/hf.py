"""Load and save Hugging Face checkpoints: config.json plus safetensors shards.

A folder holds either one `model.safetensors` or shards listed in
`model.safetensors.index.json`, as transformers' save_pretrained writes them. Loading
builds the moekit model on the meta device and assigns the converted tensors, so no
memory is spent on an initialisation that is thrown away.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..models import Transformer, meta_model
from .architectures import get, hf_config, of_hf
from .architectures.rules import Mapping, expand
from .fp8 import fp8_block_size, fp8_reader

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-persistent buffers some older checkpoints still carry; recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LISTED = 20  # names shown per list in an error
_EMBED = "model.embed_tokens.weight"


def read_hf_config(path: str | Path) -> dict:
    """The config.json of a Hugging Face folder; ValueError when absent or unreadable."""
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not a Hugging Face model folder ({CONFIG_FILE}: {error})"
        ) from None


def weight_files(path: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it}, from the index or the single file."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        return {name: path / file for name, file in index["weight_map"].items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as file:
            return dict.fromkeys(file.keys(), path / SINGLE_FILE)
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(path)!r}")


def mappings_for(
    model: Transformer, architecture: str, layout: str, hf: dict | None = None
) -> list[Mapping]:
    """The key table made concrete for model; ValueError naming the tensors it cannot place.

    hf: the checkpoint's config.json (a table may depend on it, e.g. DeepSeek's rotary
    layout)."""
    names = set(model.state_dict())
    if model.config.tied_embeddings:
        names.discard("lm_head.weight")  # one tensor, stored as the embedding
    num_experts = model.config.moe.num_experts if model.config.moe else 0
    rules = get(architecture).tables(model.config, hf or {})[layout]
    mappings = expand(rules, names, model.config.num_layers, num_experts)
    unmapped = sorted(names - {m.moekit for m in mappings})
    if unmapped:
        raise ValueError(
            f"the {architecture} layout has no place for the tensors {_listed(unmapped)}"
        )
    return mappings


def load_hf(
    path: str | Path, *, dtype: torch.dtype | None = None, mtp: bool = False
) -> Transformer:
    """A moekit Transformer from a Hugging Face folder of a supported architecture.

    Args:
        path: folder with config.json and model.safetensors (or shards and their index).
        dtype: the weights' dtype; None keeps the checkpoint's (that of its embedding, and
            fp32 for a router stored in fp32). DeepSeek's FP8 block-quantised weights
            (interop/fp8.py) are dequantized to it, by default to the embedding's dtype
            (bf16 in the published checkpoints).
        mtp: DeepSeek-V3 only: also load the multi-token-prediction layers
            (num_nextn_predict_layers of them) as the model's mtp modules, for training;
            False skips them, as transformers does.
    Returns:
        The model, in eval mode, on the CPU.
    Raises:
        ValueError: unsupported architecture or options; missing or unexpected tensors
            (each list in one message); a tensor of the wrong shape; FP8 weights without
            their scales or a quantization_config, scales of the wrong shape, a
            quantization_config moekit does not read.
    """
    hf = read_hf_config(path)
    arch = of_hf(hf)
    config = arch.load_options(arch.to_moekit(hf), hf, mtp=mtp)
    files = weight_files(path)
    layout = arch.stored_layout(hf, files)
    # FP8 weight blocks (DeepSeek's); other quantizations are a layout of their own
    fp8 = arch.quantization(hf) == "fp8_blocks"
    block = fp8_block_size(hf["quantization_config"]) if fp8 else None
    model = meta_model(config)
    mappings = mappings_for(model, arch.name, layout, hf)
    with ExitStack() as stack:
        handles = {
            f: stack.enter_context(safe_open(f, framework="pt")) for f in set(files.values())
        }

        def raw(name: str) -> Tensor:
            return handles[files[name]].get_tensor(name)

        def stored_dtype(name: str) -> str:
            return handles[files[name]].get_slice(name).get_dtype()

        if dtype is None and block is not None and _EMBED in files:
            dequantized = raw(_EMBED).dtype  # the checkpoint's unquantised dtype
        else:
            dequantized = dtype or torch.float32
        tensors, read = fp8_reader(files, stored_dtype, raw, block, dequantized)
        skipped = () if mtp else arch.unloaded_prefixes(hf)  # DeepSeek-V3's MTP layers
        _check_names(mappings, tensors, read, config.tied_embeddings, skipped)
        state = {m.moekit: _convert(m, read) for m in mappings}
    as_stored = dtype is None
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {name: _cast(name, t, dtype, as_stored) for name, t in state.items()}
    if config.tied_embeddings:
        state["lm_head.weight"] = state["tok_embed.weight"]
    _check_shapes(model, state, path, {m.moekit: m.hf for m in mappings})
    model.load_state_dict(state, strict=True, assign=True)
    if config.tied_embeddings:
        model.lm_head.weight = model.tok_embed.weight
    model.init_rope()
    return model.eval()


def _cast(name: str, tensor: Tensor, dtype: torch.dtype, as_stored: bool) -> Tensor:
    # Unless a dtype is asked for, a router's weight and selection bias stay fp32 where the
    # checkpoint keeps them so (DeepSeek-V3's gate in a bf16 checkpoint): their rounding
    # decides which experts run.
    if as_stored and ".ffn.router." in name and tensor.dtype == torch.float32:
        return tensor.contiguous()
    return tensor.to(dtype).contiguous()


def _check_names(
    mappings: list[Mapping], files: dict, read, tied: bool, skipped: tuple[str, ...] = ()
) -> None:
    expected = {name for m in mappings for name in m.hf}
    present = {
        name
        for name in files
        if not name.endswith(_IGNORED_SUFFIXES) and not (skipped and name.startswith(skipped))
    }
    unexpected = present - expected
    embed = _EMBED
    if (
        tied
        and "lm_head.weight" in unexpected
        and embed in files
        and torch.equal(read("lm_head.weight"), read(embed))
    ):
        unexpected.discard("lm_head.weight")  # a tied head written out anyway
    missing = expected - present
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(sorted(unexpected))}")
    if problems:
        raise ValueError("the checkpoint does not match its config.json: " + "; ".join(problems))


def _convert(mapping: Mapping, read) -> Tensor:
    """The moekit tensor of one mapping; a tensor the op refuses is named in the error."""
    try:
        return mapping.op.to_moekit([read(name) for name in mapping.hf])
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot read {', '.join(mapping.hf)}: {error}") from None


def _check_shapes(
    model: Transformer, state: dict[str, Tensor], path, sources: dict[str, tuple[str, ...]]
) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [
        f"{name} {tuple(t.shape)} (config says {expected[name]}) "
        f"read from {', '.join(sources.get(name, ()))}"
        for name, t in state.items()
        if tuple(t.shape) != expected[name]
    ]
    if wrong:
        raise ValueError(f"tensors in {str(path)!r} do not fit config.json: {_listed(wrong)}")


def save_hf(
    model: Transformer,
    path: str | Path,
    *,
    architecture: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    config_extra: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write model as a Hugging Face folder that transformers' from_pretrained reads.

    Args:
        model: the moekit Transformer.
        path: the folder to create (it must not exist, or be empty).
        architecture: a registered architecture (interop/architectures/); None chooses
            the first in priority order that expresses the config (choose_architecture).
            gpt_oss is written unquantized, in the weights' dtype, without a
            quantization_config.
        max_shard_bytes: above this, tensors go into several shards plus an index.
        config_extra: keys merged into config.json (token ids, say).
        extra_files: {file name: text} written beside the weights (a tokenizer, say).
    Returns:
        The folder. It is written beside, then renamed into place: never half-written.
    Raises:
        ValueError: a setting the architecture cannot express, named; a non-empty path.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{str(path)!r} exists and is not an empty folder")
    state = model.state_dict()
    dtype = state["tok_embed.weight"].dtype
    config = hf_config(model.config, architecture, dtype=str(dtype).removeprefix("torch.")) | (
        config_extra or {}
    )
    architecture = config["model_type"]  # the chosen one when None was given
    tensors: dict[str, Tensor] = {}
    for m in mappings_for(model, architecture, get(architecture).written_layout, config):
        for name, tensor in zip(m.hf, m.op.to_hf(state[m.moekit].detach().cpu())):
            # an owned, contiguous copy: safetensors refuses views that share storage
            tensors[name] = tensor.clone(memory_format=torch.contiguous_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_shards(tensors, tmp, max_shard_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_shards(tensors: dict[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"[{shown}]{more} ({len(names)})"
