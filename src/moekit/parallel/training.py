"""The distributed side of one training step, checkpoint and evaluation.

The trainer stays single-process code; where a mesh is active it calls these instead:
- batches: every rank draws the same global batch (same loader, same seed) and keeps its
  own contiguous rows, so the global batch, the data order and a resume are exactly those
  of the single-process run.
- gradients: sync_gradients (EP x DP groups), then the global-norm clip.
- metrics: losses averaged over ranks; rank 0 writes the run directory.
- checkpoints: consolidated (unsharded) files written by rank 0, loadable at any EP size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from ..train.checkpoint import (
    OPTIMIZER_FILE,
    checkpoint_dir,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    restore_rng_state,
    save_checkpoint,
)
from .apply import clip_grad_norm, sync_gradients
from .checkpoint import consolidated, full_optimizer_tensors, shard_optimizer_tensors
from .mesh import ParallelMesh


def shard_batch(inputs_BL: Tensor, targets_BL: Tensor, mesh: ParallelMesh) -> tuple[Tensor, Tensor]:
    """This rank's rows of the global batch (batch size must divide by the world size)."""
    B, W = inputs_BL.shape[0], mesh.world_size
    if B % W:
        raise ValueError(f"batch_size ({B}) must be divisible by the number of processes ({W})")
    rows = slice(mesh.rank * B // W, (mesh.rank + 1) * B // W)
    return inputs_BL[rows], targets_BL[rows]


def reduce_and_clip(model: nn.Module, max_norm: float, mesh: ParallelMesh) -> float:
    """Average the gradients over the mesh, then clip to the global norm; returns it."""
    sync_gradients(model, mesh)
    return clip_grad_norm(model, max_norm, mesh)


def mean_over_ranks(value: float, mesh: ParallelMesh) -> float:
    """The mean of a per-rank scalar (each rank's mean over equally many tokens)."""
    t = torch.tensor([value], dtype=torch.float64, device=mesh.device)
    dist.all_reduce(t, group=mesh.world_group)
    return float(t) / mesh.world_size


def any_rank(flag: bool, mesh: ParallelMesh) -> bool:
    """True on every rank when it is True on any (e.g. a Ctrl-C that reached some ranks
    a step earlier than others: all must save at the same step, or the collectives part)."""
    t = torch.tensor([int(flag)], device=mesh.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.world_group)
    return bool(t)


def save_consolidated(
    run_dir: str | Path, model: nn.Module, optimizer, state: dict, mesh: ParallelMesh
) -> Path:
    """Collective: gather the experts and their moments; rank 0 writes the checkpoint."""
    moments = full_optimizer_tensors(optimizer_tensors(model, optimizer), model)
    with consolidated(model):
        if mesh.rank == 0:
            save_checkpoint(run_dir, model, moments, state)
    dist.barrier(group=mesh.world_group)  # nobody reads the folder while rank 0 swaps it
    return Path(run_dir) / "checkpoint"


def load_consolidated(run_dir: str | Path, model: nn.Module, optimizer, mesh: ParallelMesh) -> dict:
    """Collective: every rank reads the full checkpoint and keeps its experts' slice."""
    with consolidated(model):
        state = load_checkpoint(run_dir, model)  # weights (and the file hashes checked)
    # The moments load outside the block: the optimizer holds the sharded parameters.
    saved = load_file(str(checkpoint_dir(run_dir) / OPTIMIZER_FILE))
    load_optimizer_tensors(model, optimizer, shard_optimizer_tensors(saved, model))
    restore_rng_state(state)
    return state
