"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A run directory holds `checkpoint/` with
    model.safetensors      the weights (tied embeddings stored once)
    optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
    trainer_state.json     format, versions, step, data loader state, RNG state, config,
                           and the SHA-256 of both tensor files
The files are written into `checkpoint.tmp/`, which then replaces `checkpoint/` by
rename, so a crash mid-save leaves the previous checkpoint whole. Loading checks the
format and the hashes first: a truncated or edited file is one clear CheckpointError,
raised before anything is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .. import __version__

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or from an incompatible version."""


def checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The run's checkpoint folder, or None when it has none.

    Falls back to `checkpoint.prev/` when a save stopped between its two renames.
    """
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".prev"):
        if (run_dir / name / STATE_FILE).exists():
            return run_dir / name
    return None


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.Tensor],
    state: dict,
) -> Path:
    """Write model, optimizer and trainer state atomically into run_dir/checkpoint/.

    Args:
        run_dir: the run directory.
        model: the model; its state_dict goes to model.safetensors.
        optimizer: an optimizer over model's named parameters (AdamW-style state), or its
            tensors as optimizer_tensors() gives them (expert parallelism gathers them first).
        state: JSON-ready trainer state (step, loader, config, ...); format, versions,
            RNG state and file hashes are added here.
    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    tmp, final, prev = (run_dir / f"{CHECKPOINT_DIR}{s}" for s in (".tmp", "", ".prev"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    if not isinstance(optimizer, dict):
        optimizer = optimizer_tensors(model, optimizer)
    save_file(optimizer, str(tmp / OPTIMIZER_FILE))
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        _fsync(tmp / name)  # on disk before the rename makes them the checkpoint
    full_state = dict(state) | {
        "format": CHECKPOINT_FORMAT,
        "versions": {"moekit": __version__, "torch": torch.__version__},
        "rng": {"torch": _encode(torch.get_rng_state())},
        "sha256": {name: _sha256(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE)},
    }
    _write_synced(tmp / STATE_FILE, json.dumps(full_state, indent=1))
    # Swap folders: checkpoint -> checkpoint.prev, checkpoint.tmp -> checkpoint.
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def read_checkpoint_state(run_dir: str | Path) -> tuple[Path, dict]:
    """The checkpoint folder and its verified trainer state (format and file hashes checked).

    Raises:
        CheckpointError: no checkpoint, unreadable state, incompatible format, or a tensor
            file whose hash does not match (truncated or corrupt).
    """
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise CheckpointError(
            f"no checkpoint in {str(run_dir)!r} (expected {CHECKPOINT_DIR}/{STATE_FILE})"
        )
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint state {str(state_path)!r} is unreadable: {error}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        version = state.get("versions", {}).get("moekit", "?") if isinstance(state, dict) else "?"
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has format {found!r} (written by moekit {version}); "
            f"moekit {__version__} reads format {CHECKPOINT_FORMAT}"
        )
    hashes = state.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != {MODEL_FILE, OPTIMIZER_FILE}:
        raise CheckpointError(
            f"checkpoint state {str(state_path)!r} lacks the SHA-256 of its tensor files"
        )
    for name, expected in hashes.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != expected:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is missing, truncated or corrupt "
                "(its SHA-256 does not match trainer_state.json)"
            )
    return folder, state


def load_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load a verified checkpoint into model (and optimizer) and restore the RNG state.

    Args:
        run_dir: the run directory.
        model: a model built from the run's config.
        optimizer: if given, its state is restored too (and the torch RNG state).
    Returns:
        The trainer state dict from trainer_state.json.
    Raises:
        CheckpointError: see read_checkpoint_state; also tensors that do not fit the model.
    """
    folder, state = read_checkpoint_state(run_dir)
    try:
        load_model(model, str(folder / MODEL_FILE), strict=True)
        if optimizer is not None:
            load_optimizer_tensors(model, optimizer, load_file(str(folder / OPTIMIZER_FILE)))
    except (SafetensorError, RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not fit this model: {error}"
        ) from None
    if optimizer is not None:
        restore_rng_state(state)
    return state


def restore_rng_state(state: dict) -> None:
    """Set torch's RNG to the state a checkpoint's trainer_state.json recorded."""
    torch.set_rng_state(_decode(state["rng"]["torch"]))


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors: "{param name}.{exp_avg|exp_avg_sq|step}"."""
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict
) -> None:
    """Inverse of optimizer_tensors: restore each parameter's state by name."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = value
    names = [name for name, _ in model.named_parameters()]
    unknown = sorted(set(by_param) - set(names))
    if unknown:
        raise KeyError(f"optimizer state for unknown parameters {unknown[:3]}")
    saved = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    params = dict(model.named_parameters())
    saved["state"] = {index[id(params[name])]: fields for name, fields in by_param.items()}
    optimizer.load_state_dict(saved)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
