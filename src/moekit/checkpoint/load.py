"""Reading a checkpoint back: its trainer state verified (format, layout, every file's
SHA-256) before any tensor is loaded, then the model, the AdamW state and the RNG state."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .. import __version__
from ..parallel import ParallelMesh
from .consolidated import read_consolidated
from .folder import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    LAYOUTS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDS_DIR,
    STATE_FILE,
    CheckpointError,
    checkpoint_dir,
    restore_rng_state,
)
from .hashing import sha256_file, shard_hashes
from .sharded import read_shards


def read_checkpoint_state(
    run_dir: str | Path, mesh: ParallelMesh | None = None
) -> tuple[Path, dict]:
    """The checkpoint folder and its verified trainer state (format and file hashes checked).

    mesh: the ranks that read a sharded checkpoint together (each hashes its share of the
    shard files; collective); None: this process hashes every file.

    Raises:
        CheckpointError: no checkpoint, unreadable state, incompatible format, or a tensor
            file whose hash does not match (truncated or corrupt).
    """
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise CheckpointError(
            f"no checkpoint in {str(run_dir)!r} (expected {CHECKPOINT_DIR}/{STATE_FILE})"
        )
    state = _read_state(folder)
    layout = checkpoint_layout(state)
    hashes = state.get("sha256")
    expected = {MODEL_FILE, OPTIMIZER_FILE} if layout == "consolidated" else None
    if (
        not isinstance(hashes, dict)
        or not hashes
        or (expected is not None and set(hashes) != expected)
        or (expected is None and not all(n.startswith(f"{SHARDS_DIR}/") for n in hashes))
    ):
        raise CheckpointError(
            f"checkpoint state {str(folder / STATE_FILE)!r} lacks the SHA-256 of its tensor files"
        )
    if layout == "sharded":
        found = shard_hashes(folder / SHARDS_DIR, mesh)
        found = {f"{SHARDS_DIR}/{name}": digest for name, digest in found.items()}
    else:
        found = {n: sha256_file(folder / n) for n in hashes if (folder / n).is_file()}
    for name in sorted(set(hashes) | set(found)):
        if found.get(name) != hashes.get(name):
            raise CheckpointError(
                f"checkpoint file {str(folder / name)!r} is missing, truncated or corrupt, or "
                "not part of the checkpoint (its SHA-256 does not match trainer_state.json)"
            )
    return folder, state


def _read_state(folder: Path) -> dict:
    """trainer_state.json, of this moekit's checkpoint format."""
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
    return state


def checkpoint_layout(state: dict) -> str:
    """ "consolidated" or "sharded": how a checkpoint's trainer state says its tensors are
    stored (checkpoints from before the sharded layout are consolidated)."""
    layout = state.get("tensors", "consolidated")
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; this moekit reads {LAYOUTS}")
    return layout


def saved_layout(run_dir: str | Path) -> str | None:
    """The layout of run_dir's checkpoint (unverified; None when unreadable or absent)."""
    folder = checkpoint_dir(run_dir)
    try:
        return checkpoint_layout(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
    except (TypeError, OSError, ValueError, AttributeError):
        return None


def load_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    mesh: ParallelMesh | None = None,
) -> dict:
    """Load a verified checkpoint into model (and optimizer) and restore the RNG state.

    Args:
        run_dir: the run directory.
        model: a model built from the run's config.
        optimizer: if given, its state is restored too (and the torch RNG state).
        mesh: the ranks reading a sharded checkpoint together, each into its own shards
            (collective); None: this process, the whole model. A consolidated checkpoint
            is read whole by one process (checkpoint/gathered.py spreads it over a mesh).
    Returns:
        The trainer state dict from trainer_state.json.
    Raises:
        CheckpointError: see read_checkpoint_state; also tensors that do not fit the model.
    """
    folder, state = read_checkpoint_state(run_dir, mesh)
    try:
        if checkpoint_layout(state) == "sharded":
            read_shards(folder / SHARDS_DIR, model, optimizer, mesh)
        else:
            read_consolidated(folder, model, optimizer)
    except (SafetensorError, RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not fit this model: {error}"
        ) from None
    if optimizer is not None:
        restore_rng_state(state)
    return state
