"""Checkpoints of a model spread over ranks (train/run.py's DistributedRun and FSDPRun).

The sharded layout: every rank writes and reads its own shards (sharded.py). The
consolidated layout: one copy whatever the ranks, so it resumes at any layout, one process
included. Saving gathers every tensor on every rank for the moment of the save (expert
parallelism: the EP group's expert slices, parallel/gather.py; FSDP: every shard,
parallel/fsdp.py) and rank 0 writes; loading reads the whole tensors and keeps this
rank's part of each.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models import Transformer
from ..parallel import (
    ParallelMesh,
    consolidated,
    full_optimizer_tensors,
    shard_optimizer_tensors,
)
from ..parallel.fsdp import (
    full_optimizer_state,
    full_state,
    load_full_optimizer_state,
    load_full_state,
)
from .consolidated import (
    load_optimizer_tensors,
    optimizer_tensors,
    read_optimizer_file,
    save_checkpoint,
)
from .folder import CHECKPOINT_DIR, barrier, checkpoint_dir, restore_rng_state
from .load import load_checkpoint, saved_layout
from .sharded import save_sharded_checkpoint


def save_on_mesh(
    run_dir: str | Path, model: nn.Module, optimizer, state: dict, mesh: ParallelMesh
) -> Path:
    """Save in mesh.checkpoint_format (collective): "sharded", every rank its own shards;
    "consolidated", gathered (FSDP's shards when mesh.fsdp, else the experts) and written
    by rank 0. Returns the checkpoint folder."""
    if mesh.checkpoint_format == "sharded":
        return save_sharded_checkpoint(run_dir, model, optimizer, state, mesh)
    if mesh.fsdp:
        _save_fully_sharded(run_dir, model, optimizer, state, mesh)
    else:
        _save_expert_parallel(run_dir, model, optimizer, state, mesh)
    barrier(mesh)  # nobody reads the folder while rank 0 swaps it
    return Path(run_dir) / CHECKPOINT_DIR


def load_on_mesh(run_dir: str | Path, model: nn.Module, optimizer, mesh: ParallelMesh) -> dict:
    """Load either layout into this rank's part of model and optimizer (collective), and
    restore the RNG state. Returns the trainer state."""
    if saved_layout(run_dir) == "sharded":
        return load_checkpoint(run_dir, model, optimizer, mesh=mesh)
    if mesh.fsdp:
        whole = Transformer(model.config)
        state = load_checkpoint(run_dir, whole)  # the file hashes checked
        load_full_state(model, whole.state_dict())
        saved = read_optimizer_file(checkpoint_dir(run_dir))
        load_full_optimizer_state(model, optimizer, saved)
    else:
        with consolidated(model):
            state = load_checkpoint(run_dir, model)  # weights (and the file hashes checked)
        # The moments load outside the block: the optimizer holds the sharded parameters.
        saved = read_optimizer_file(checkpoint_dir(run_dir))
        load_optimizer_tensors(model, optimizer, shard_optimizer_tensors(saved, model))
    restore_rng_state(state)
    return state


def _save_expert_parallel(run_dir, model: nn.Module, optimizer, state: dict, mesh) -> None:
    """Gather the experts and their moments; rank 0 writes."""
    moments = full_optimizer_tensors(optimizer_tensors(model, optimizer), model)
    with consolidated(model):
        if mesh.rank == 0:
            save_checkpoint(run_dir, model, moments, state)


def _save_fully_sharded(run_dir, model: nn.Module, optimizer, state: dict, mesh) -> None:
    """Gather every FSDP shard (and the experts); rank 0 writes a whole model's files."""
    weights, moments = full_state(model), full_optimizer_state(model, optimizer)
    if mesh.rank == 0:
        whole = Transformer(model.config)
        whole.load_state_dict(weights)
        save_checkpoint(run_dir, whole, moments, state)
