"""The run folder: its layout, its format version, its config.json, and reading a run back.

One Trainer trains one model in one run directory:
    RUN/config.json          format, moekit version, model and train config, data source
    RUN/tokenizer.json, RUN/data/   the token streams (see train/data.py)
    RUN/metrics.jsonl        one line per step and per evaluation (train/metrics.py)
    RUN/routing.jsonl        per-layer routing statistics of MoE runs (train/metrics.py)
    RUN/checkpoint/          weights and trainer state (the checkpoint package)
A converted run (interop/convert.py) and a task run (tasks/loop.py) write the same
config.json through write_run_config; a task run's has a "task" entry, and the readers of
language-model runs here refuse it by name (check_language_model_run). The checkpoint folder's own layout and its atomic
swap belong to moekit.checkpoint, a floor below train; checkpoint_dir (which falls back to
checkpoint.prev/ when a save stopped between its renames) is its answer to "where is this
run's checkpoint", and every caller above asks it here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..checkpoint import checkpoint_dir, load_checkpoint
from ..files import write_text_synced
from ..models import ModelConfig, Transformer
from ..models.lora import LoRAConfig, add_lora, merge_lora
from .config import TrainConfig, model_config_from_dict, train_config_from_dict

CONFIG_FILE = "config.json"
RUN_FORMAT = 1

__all__ = [
    "CONFIG_FILE",
    "RUN_FORMAT",
    "check_language_model_run",
    "checkpoint_dir",
    "is_run_dir",
    "load_trained_model",
    "new_run_config",
    "read_run_config",
    "run_configs",
    "write_run_config",
]


def new_run_config(**fields) -> dict:
    """A new run's config.json: the format and moekit version, then fields in order
    (model, train, data, ...)."""
    return {"format": RUN_FORMAT, "moekit_version": __version__, **fields}


def write_run_config(run_dir: str | Path, config: dict) -> None:
    """Write RUN/config.json atomically: beside it, flushed to disk, then renamed."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    write_text_synced(tmp, json.dumps(config, indent=1))
    os.replace(tmp, path)


def read_run_config(run_dir: str | Path) -> dict:
    """The run's config.json; ValueError when missing, unreadable or of another format."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(run_dir)!r} is not a moekit run directory ({CONFIG_FILE}: {error})"
        ) from None
    if config.get("format") != RUN_FORMAT:
        raise ValueError(
            f"run {str(run_dir)!r} has format {config.get('format')!r} (moekit "
            f"{config.get('moekit_version', '?')}); moekit {__version__} reads format {RUN_FORMAT}"
        )
    return config


def is_run_dir(path: str | Path) -> bool:
    """True for a moekit run directory (a run-format config.json), False for anything else
    (a Hugging Face folder's config.json, say)."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "model" in config and "format" in config


def check_language_model_run(run_dir: str | Path, command: str) -> None:
    """ValueError in one line when run_dir is a task run (`moekit train --task NAME`, whose
    config.json describes a classifier, multi-task or vision model): command names who
    reads only language-model runs. A folder without a readable config.json passes: its
    reader says what is wrong with it."""
    try:
        config = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    _refuse_task_run(config, run_dir, command)


def _refuse_task_run(config: dict, run_dir: str | Path, reader: str) -> None:
    task = config.get("task") if isinstance(config, dict) else None
    if task is not None:
        raise ValueError(
            f"{str(run_dir)!r} is a --task {task} run; {reader} reads language-model runs "
            "(trained by `moekit train` without --task)"
        )


def run_configs(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, str | None]:
    """The model config, train config and data source saved in a language-model run
    directory; ValueError naming the task of a task run (check_language_model_run)."""
    saved = read_run_config(run_dir)
    _refuse_task_run(saved, run_dir, "this command")
    return (
        model_config_from_dict(saved["model"]),
        train_config_from_dict(saved["train"]),
        saved["data"],
    )


def load_trained_model(run_dir: str | Path) -> Transformer:
    """The run's model with its checkpoint's weights, in eval mode.

    A LoRA fine-tuning run (its config.json's data names a "lora" rank) comes back with
    the adapters merged into the weights.
    """
    model_config, _, source = run_configs(run_dir)
    model = Transformer(model_config)
    lora = source.get("lora") if isinstance(source, dict) else None
    if lora and lora.get("rank"):
        add_lora(model, LoRAConfig(**lora))
    load_checkpoint(run_dir, model)
    return (merge_lora(model) if lora and lora.get("rank") else model).eval()
