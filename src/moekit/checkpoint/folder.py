"""The checkpoint folder: its names, trainer_state.json, and the atomic swap.

The files are written into `checkpoint.tmp/` (every rank its own shards), which then
replaces `checkpoint/` by rename, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..files import replace_folder, write_text_synced
from ..parallel import ParallelMesh

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
SHARDS_DIR = "shards"
LAYOUTS = ("consolidated", "sharded")  # trainer_state.json's "tensors"


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


def tmp_dir(run_dir: str | Path) -> Path:
    """Where a save writes before the swap."""
    return Path(run_dir) / f"{CHECKPOINT_DIR}.tmp"


def fresh_tmp(run_dir: str | Path) -> Path:
    """tmp_dir(run_dir), emptied of an earlier save that stopped halfway."""
    tmp = tmp_dir(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def barrier(mesh: ParallelMesh | None) -> None:
    """Wait for every rank of the mesh (nothing for one process)."""
    if mesh is not None:
        torch.distributed.barrier(group=mesh.world_group)


def commit(run_dir: str | Path, tmp: Path, state: dict, hashes: dict, layout: str) -> Path:
    """Add trainer_state.json to the written tmp folder and swap it in as the checkpoint.

    Args:
        run_dir: the run directory.
        tmp: the folder holding the tensor files, already on disk.
        state: JSON-ready trainer state; format, layout, versions, RNG state and hashes
            are added here.
        hashes: {file name relative to the folder: SHA-256 hex}.
        layout: one of LAYOUTS.
    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    final, prev = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.prev"
    full_state = dict(state) | {
        "format": CHECKPOINT_FORMAT,
        "tensors": layout,
        "versions": {"moekit": __version__, "torch": torch.__version__},
        "rng": {"torch": _encode(torch.get_rng_state())},
        "sha256": hashes,
    }
    write_text_synced(tmp / STATE_FILE, json.dumps(full_state, indent=1))
    # Swap folders: checkpoint -> checkpoint.prev, checkpoint.tmp -> checkpoint.
    replace_folder(tmp, final, prev)
    return final


def restore_rng_state(state: dict) -> None:
    """Set torch's RNG to the state a checkpoint's trainer_state.json recorded."""
    torch.set_rng_state(_decode(state["rng"]["torch"]))


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
