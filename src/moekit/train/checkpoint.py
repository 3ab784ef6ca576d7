"""Checkpoints: safetensors (or torch.distributed.checkpoint shards) for tensors, JSON for
everything else, never pickle.

A run directory holds `checkpoint/` in one of two layouts. Consolidated (one process, and
the default under torchrun without FSDP):
    model.safetensors      the weights (tied embeddings stored once)
    optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
    trainer_state.json     format, versions, step, data loader state, RNG state, config,
                           and the SHA-256 of both tensor files
Sharded (the default under --parallel.fsdp true; parallel/sharded.py):
    shards/shard-NNNNN-model-00001-of-00001.safetensors
                           what rank NNNNN - 1 wrote: its chunks of the weights and AdamW
                           state in one-process coordinates (DCP's safetensors storage)
    trainer_state.json     the same state, "tensors": "sharded", and every shard's SHA-256
The files are written into `checkpoint.tmp/` (every rank its own shards), which then
replaces `checkpoint/` by rename, so a crash mid-save leaves the previous checkpoint whole.
Loading checks the format and the hashes first: a truncated or edited file is one clear
CheckpointError, raised before anything is written. Either layout loads at any layout.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .. import __version__
from ..files import fsync_file, write_text_synced
from ..parallel import ParallelMesh
from ..parallel.sharded import file_hashes, read_shards, sha256_file, write_shards

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
    tmp = _fresh_tmp(run_dir)
    save_model(model, str(tmp / MODEL_FILE))
    if not isinstance(optimizer, dict):
        optimizer = optimizer_tensors(model, optimizer)
    save_file(optimizer, str(tmp / OPTIMIZER_FILE))
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        fsync_file(tmp / name)  # on disk before the rename makes them the checkpoint
    hashes = {name: _sha256(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE)}
    return _commit(run_dir, tmp, state, hashes, "consolidated")


def save_sharded_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    mesh: ParallelMesh | None,
) -> Path:
    """Write the sharded layout atomically (collective over the mesh: every rank writes
    its own shards; rank 0 then writes trainer_state.json and renames the folder).

    Args: as save_checkpoint; mesh: the ranks (None: this process alone).
    Returns:
        The checkpoint folder.
    """
    main = mesh is None or mesh.rank == 0
    tmp = Path(run_dir) / f"{CHECKPOINT_DIR}.tmp"
    if main:
        _fresh_tmp(run_dir)
    _barrier(mesh)  # nobody writes into the folder before rank 0 has emptied it
    write_shards(tmp / SHARDS_DIR, model, optimizer, mesh)  # each rank's files fsynced
    hashes = {f"{SHARDS_DIR}/{n}": h for n, h in file_hashes(tmp / SHARDS_DIR, mesh).items()}
    if main:
        _commit(run_dir, tmp, state, hashes, "sharded")
    _barrier(mesh)  # nobody reads the folder while rank 0 swaps it
    return Path(run_dir) / CHECKPOINT_DIR


def _barrier(mesh: ParallelMesh | None) -> None:
    if mesh is not None:
        torch.distributed.barrier(group=mesh.world_group)


def _fresh_tmp(run_dir: str | Path) -> Path:
    tmp = Path(run_dir) / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(run_dir: str | Path, tmp: Path, state: dict, hashes: dict, layout: str) -> Path:
    """Add trainer_state.json to the written tmp folder and swap it in as the checkpoint."""
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
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
    return final


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
            f"checkpoint state {str(state_path)!r} lacks the SHA-256 of its tensor files"
        )
    if layout == "sharded":
        found = file_hashes(folder / SHARDS_DIR, mesh)
        found = {f"{SHARDS_DIR}/{name}": digest for name, digest in found.items()}
    else:
        found = {n: _sha256(folder / n) for n in hashes if (folder / n).is_file()}
    for name in sorted(set(hashes) | set(found)):
        if found.get(name) != hashes.get(name):
            raise CheckpointError(
                f"checkpoint file {str(folder / name)!r} is missing, truncated or corrupt, or "
                "not part of the checkpoint (its SHA-256 does not match trainer_state.json)"
            )
    return folder, state


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
            is read whole by one process (train/run.py spreads it over a mesh).
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
    return sha256_file(path).hex()
