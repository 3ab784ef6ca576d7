"""`moekit convert`: a Hugging Face folder to a moekit run directory, and back.

A converted run directory is what `moekit eval` and `moekit generate` read: config.json
in the run format (the model config, default train settings, no data source) and a
checkpoint/ (weights in safetensors, an empty optimizer state, step 0). tokenizer.json is
copied either way when the source has one, byte for byte. A run converted without one
records only "converted_from": the commands that read its text refuse it until given
--tokenizer PATH (data/tokenizer.py run_tokenizer), never train a tokenizer of their own.

Hugging Face -> run: the tokenizer's special ids (end of sequence, beginning, padding,
whether text starts with bos) are read from the folder's tokenizer_config.json,
special_tokens_map.json, config.json and generation_config.json and recorded beside
tokenizer.json as special_tokens.json (see data/special_tokens.py), which every moekit
command that reads the run's tokenizer uses.

Run -> Hugging Face: config.json gets the tokenizer's eos/bos/pad ids, generation_config.json
every eos id, and tokenizer_config.json the token names, so that transformers'
AutoTokenizer and generate() use the same ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer, copy_tokenizer
from ..models import Transformer
from ..train.config import TrainConfig, model_config_to_dict
from ..train.rundir import (
    checkpoint_dir,
    is_run_dir,
    load_trained_model,
    new_run_config,
    write_run_config,
)
from .hf import load_hf, save_hf

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def convert(
    src: str | Path, dst: str | Path, *, architecture: str | None = None, mtp: bool = False
) -> str:
    """Convert src to dst in the direction src's config.json says.

    Args:
        src: a Hugging Face folder (config.json with model_type) or a trained run directory.
        dst: the folder to create (must not exist, or be empty).
        architecture: for run -> Hugging Face only: mixtral, qwen2_moe, qwen3_moe, olmoe,
            deepseek_v2, deepseek_v3 or gpt_oss (None chooses from the config).
        mtp: for Hugging Face -> run only: keep DeepSeek-V3's multi-token-prediction
            layers (load_hf's mtp); a run's MTP modules are always written.
    Returns:
        "hf-to-run" or "run-to-hf".
    """
    if is_run_dir(src):
        if mtp:
            raise ValueError("--mtp applies to a Hugging Face -> moekit run conversion only")
        run_to_hf(src, dst, architecture=architecture)
        return "run-to-hf"
    if architecture is not None:
        raise ValueError("--architecture applies to a moekit run -> Hugging Face conversion only")
    hf_to_run(src, dst, mtp=mtp)
    return "hf-to-run"


def hf_to_run(src: str | Path, dst: str | Path, *, mtp: bool = False) -> Path:
    """Write the Hugging Face model in src as a moekit run directory dst (with mtp, its
    DeepSeek-V3 multi-token-prediction layers too)."""
    _check_empty(dst)
    model = load_hf(src, mtp=mtp)
    if (Path(src) / TOKENIZER_FILE).is_file():
        # Read before anything is written: files naming tokens the tokenizer lacks stop here.
        Tokenizer.load(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_run(model, dst, source=str(src))
    if (Path(src) / TOKENIZER_FILE).is_file():
        copy_tokenizer(src, dst)
    return dst


def write_run(model: Transformer, run_dir: Path, *, source: str) -> None:
    """A run directory holding model at step 0: config.json and an atomic checkpoint."""
    run_config = new_run_config(
        model=model_config_to_dict(model.config),
        # eval reads its sequence length from here: no longer than the model's context
        train=dataclasses.asdict(
            TrainConfig(seq_len=min(TrainConfig.seq_len, model.config.max_seq_len))
        ),
        data=None,
        converted_from=source,
    )
    write_run_config(run_dir, run_config)
    # No optimizer moments yet: an AdamW that has not stepped holds no state.
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 0, "train_seconds": 0.0, "loader": None, "config": run_config}
    save_checkpoint(run_dir, model, optimizer, state)


def run_to_hf(src: str | Path, dst: str | Path, *, architecture: str | None = None) -> Path:
    """Write the trained run src as a Hugging Face folder dst (config.json, safetensors)."""
    if checkpoint_dir(src) is None:
        raise ValueError(f"{str(src)!r} has no checkpoint to convert")
    model = load_trained_model(src)
    config_extra, files = {}, {}
    if (Path(src) / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.load(src)
        files[TOKENIZER_FILE] = (Path(src) / TOKENIZER_FILE).read_text(encoding="utf-8")
        config_extra, files[TOKENIZER_CONFIG_FILE], generation = hf_tokenizer_files(
            tokenizer, model.config.max_seq_len
        )
        if generation is not None:
            files[GENERATION_CONFIG_FILE] = generation
    return save_hf(
        model, dst, architecture=architecture, config_extra=config_extra, extra_files=files
    )


def hf_tokenizer_files(tokenizer: Tokenizer, max_length: int) -> tuple[dict, str, str | None]:
    """What transformers needs to use tokenizer's special ids: config.json's token ids, the
    text of tokenizer_config.json, and of generation_config.json (None when there is no
    eos id to list)."""
    eos_ids, bos, pad = list(tokenizer.eos_ids), tokenizer.bos_id, tokenizer.special.pad_id
    ids = {
        "eos_token_id": eos_ids[0] if eos_ids else None,
        "bos_token_id": bos,
        "pad_token_id": pad,
    }
    config_extra = {key: value for key, value in ids.items() if value is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.token(eos_ids[0]) if eos_ids else None,
        "bos_token": tokenizer.token(bos),
        "pad_token": tokenizer.token(pad),
        "add_bos_token": tokenizer.add_bos,
        "model_max_length": max_length,
    }
    generation = None
    if eos_ids:
        generation_ids = {
            **config_extra,
            "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
        }
        generation = json.dumps(generation_ids, indent=2)
    return config_extra, json.dumps(tokenizer_config, indent=2), generation


def _check_empty(path: str | Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{str(path)!r} exists and is not an empty folder")
