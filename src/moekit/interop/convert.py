"""`moekit convert`: a Hugging Face folder to a moekit run directory, and back.

A converted run directory is what `moekit eval` and `moekit generate` read: config.json
in the run format (the model config, default train settings, no data source) and a
checkpoint/ (weights in safetensors, an empty optimizer state, step 0). tokenizer.json is
copied either way when the source has one. moekit's own commands need a moekit tokenizer
(with <|endoftext|> and <|pad|>); a Hugging Face tokenizer.json travels along unchanged
for the user's own tooling.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..data.tokenizer import END_OF_DOCUMENT, PADDING, TOKENIZER_FILE, Tokenizer
from ..models import Transformer
from ..train.checkpoint import checkpoint_dir, save_checkpoint
from ..train.config import TrainConfig, model_config_to_dict
from ..train.trainer import CONFIG_FILE, RUN_FORMAT, load_trained_model
from .hf import load_hf, save_hf

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def is_run_dir(path: str | Path) -> bool:
    """True for a moekit run directory (a run-format config.json), False for anything else."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "model" in config and "format" in config


def convert(src: str | Path, dst: str | Path, *, architecture: str | None = None) -> str:
    """Convert src to dst in the direction src's config.json says.

    Args:
        src: a Hugging Face folder (config.json with model_type) or a trained run directory.
        dst: the folder to create (must not exist, or be empty).
        architecture: for run -> Hugging Face only: mixtral, qwen2_moe, qwen3_moe, olmoe or gpt_oss
            (None chooses from the config).
    Returns:
        "hf-to-run" or "run-to-hf".
    """
    if is_run_dir(src):
        run_to_hf(src, dst, architecture=architecture)
        return "run-to-hf"
    if architecture is not None:
        raise ValueError("--architecture applies to a moekit run -> Hugging Face conversion only")
    hf_to_run(src, dst)
    return "hf-to-run"


def hf_to_run(src: str | Path, dst: str | Path) -> Path:
    """Write the Hugging Face model in src as a moekit run directory dst."""
    _check_empty(dst)
    model = load_hf(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_run(model, dst, source=str(src))
    if (Path(src) / TOKENIZER_FILE).is_file():
        shutil.copy2(Path(src) / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    return dst


def write_run(model: Transformer, run_dir: Path, *, source: str) -> None:
    """A run directory holding model at step 0: config.json and an atomic checkpoint."""
    run_config = {
        "format": RUN_FORMAT,
        "moekit_version": __version__,
        "model": model_config_to_dict(model.config),
        # eval reads its sequence length from here: no longer than the model's context
        "train": dataclasses.asdict(
            TrainConfig(seq_len=min(TrainConfig.seq_len, model.config.max_seq_len))
        ),
        "data": None,
        "converted_from": source,
    }
    tmp = run_dir / f"{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(run_config, indent=1), encoding="utf-8")
    tmp.replace(run_dir / CONFIG_FILE)
    # No optimizer moments yet: an AdamW that has not stepped holds no state.
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 0, "train_seconds": 0.0, "loader": None, "config": run_config}
    save_checkpoint(run_dir, model, optimizer, state)


def run_to_hf(src: str | Path, dst: str | Path, *, architecture: str | None = None) -> Path:
    """Write the trained run src as a Hugging Face folder dst (config.json, safetensors)."""
    if checkpoint_dir(src) is None:
        raise ValueError(f"{str(src)!r} has no checkpoint to convert")
    model = load_trained_model(src)
    tokenizer_file = Path(src) / TOKENIZER_FILE
    tokenizer = None
    if tokenizer_file.is_file():
        try:
            tokenizer = Tokenizer.load(tokenizer_file)
        except ValueError:
            pass  # not a moekit tokenizer (one carried over from Hugging Face): no ids to record
    config_extra, files = {}, {}
    if tokenizer_file.is_file():
        files[TOKENIZER_FILE] = tokenizer_file.read_text(encoding="utf-8")
    if tokenizer is not None:
        config_extra = {"eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id}
        # what AutoTokenizer.from_pretrained needs to load tokenizer.json
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": END_OF_DOCUMENT,
            "pad_token": PADDING,
            "model_max_length": model.config.max_seq_len,
        }
        files[TOKENIZER_CONFIG_FILE] = json.dumps(tokenizer_config, indent=2)
    return save_hf(
        model, dst, architecture=architecture, config_extra=config_extra, extra_files=files
    )


def _check_empty(path: str | Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{str(path)!r} exists and is not an empty folder")
