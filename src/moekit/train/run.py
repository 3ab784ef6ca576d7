"""Where a training run executes: one process, or a mesh of ranks. One contract, two classes.

The Trainer is single-process code that calls a Run for everything that differs between
the two, as the MoE layer calls a dispatch plan:

    run.shard(*tensors)          this rank's rows of a global batch
    run.mean(value)              a per-rank scalar averaged over the ranks
    run.any(flag)                True on every rank when it is True on any
    run.sum(tensor)              a per-rank tensor summed over the ranks
    run.no_sync()                backwards in the block only accumulate (gradient
                                 accumulation: the reduction waits for the last one)
    run.reduce_and_clip(model, max_norm)
                                 gradients averaged over the ranks, clipped to the global
                                 norm (returned), router loads summed for the bias update
    run.build(config)            the model, on this rank (FSDP: built on the meta device,
                                 only this rank's shards ever materialised)
    run.save(run_dir, ...) / run.load(run_dir, ...)
                                 the checkpoint: consolidated (one copy whatever the ranks)
                                 or sharded (each rank its own shards); either loads anywhere
    run.main_first()             rank 0 runs the block (writes files) before the others
    run.is_main, run.rank        rank 0 writes the run directory and reports

LocalRun is the identity of all of these. DistributedRun (under torchrun, see
docs/scaling.md) works on a ParallelMesh (FSDPRun, for `--parallel.fsdp true`, shards the
model with FSDP2 on top of it):
- batches: every rank draws the same global batch (same loader, same seed) and keeps its
  own contiguous rows, so the global batch, the data order and a resume are exactly those
  of the single-process run.
- gradients: averaged over the EP x DP groups in buckets that start during the backward
  (parallel/overlap.py; sync_gradients' result), then the global-norm clip.
- checkpoints: consolidated (unsharded) files written by rank 0, or with
  mesh.checkpoint_format "sharded" (the default under FSDP) torch.distributed.checkpoint
  shards written by every rank; both load at any layout (moekit.checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, load_on_mesh, save_checkpoint, save_on_mesh
from ..models import Transformer
from ..parallel import ParallelMesh, all_reduce_router_loads, clip_grad_norm, parallelize
from ..parallel.fsdp import fully_shard_model, reduce_and_clip_sharded, sharded_bytes
from ..parallel.meta import sharded_transformer
from ..parallel.overlap import BucketedReducer


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0 = no clipping); returns the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


class LocalRun:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def build(self, config) -> nn.Module:
        return self.prepare(Transformer(config))

    def shard(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

    def mean(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def no_sync(self):
        return contextlib.nullcontext()

    def report_memory(self, model: nn.Module, optimizer, run_dir: str | Path) -> None:
        pass  # one process: nothing is split, nothing to report

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> float:
        return clip_gradients(model, max_norm)

    def save(self, run_dir: str | Path, model: nn.Module, optimizer, state: dict) -> Path:
        return save_checkpoint(run_dir, model, optimizer, state)

    def load(self, run_dir: str | Path, model: nn.Module, optimizer) -> dict:
        return load_checkpoint(run_dir, model, optimizer)

    @contextlib.contextmanager
    def main_first(self):
        yield


class DistributedRun:
    """The ranks of a ParallelMesh (expert x data parallel); every method is collective."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self.rank, self.world_size = mesh.rank, mesh.world_size
        self.is_main = mesh.rank == 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts over the EP group; replicas start from rank 0's weights; the
        gradient all-reduce then runs in buckets during the backward (parallel/overlap.py)."""
        model = parallelize(model, self.mesh)
        self.reducer = BucketedReducer(model, self.mesh)
        return model

    def build(self, config) -> nn.Module:
        """A fresh model (the global RNG's next draws, as in one process), prepared."""
        return self.prepare(Transformer(config))

    def shard(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """This rank's rows of each global batch (its size must divide by the world size)."""
        B, W = tensors[0].shape[0], self.world_size
        if B % W:
            raise ValueError(f"batch_size ({B}) must be divisible by the number of processes ({W})")
        rows = slice(self.rank * B // W, (self.rank + 1) * B // W)
        return tuple(t[rows] for t in tensors)

    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar (each rank's mean over equally many tokens)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.mesh.device)
        dist.all_reduce(t, group=self.mesh.world_group)
        return float(t) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a Ctrl-C that reached some ranks
        a step earlier than others: all must save at the same step, or the collectives part)."""
        t = torch.tensor([int(flag)], device=self.mesh.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.world_group)
        return bool(t)

    def sum(self, tensor: Tensor) -> Tensor:
        """A per-rank tensor summed over the ranks (a new tensor on the tensor's device)."""
        total = tensor.to(self.mesh.device, copy=True)
        dist.all_reduce(total, group=self.mesh.world_group)
        return total.to(tensor.device)

    def no_sync(self):
        """Backwards in the block accumulate gradients without starting their all-reduce
        (the micro-batches of a step but the last)."""
        return self.reducer.paused()

    def report_memory(self, model: nn.Module, optimizer, run_dir: str | Path) -> None:
        """The largest rank's parameter, gradient and optimizer-state MiB (collective):
        printed by rank 0 and written to RUN/memory.json."""
        held = sharded_bytes(model, optimizer)
        held["gradients"] = held["parameters"]  # every trained weight gets a gradient
        names = ("parameters", "gradients", "optimizer")
        t = torch.tensor([held[k] for k in names], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.world_group)
        memory = {f"{k}_mib": round(v / 2**20, 3) for k, v in zip(names, t.tolist())}
        if self.is_main:
            (Path(run_dir) / MEMORY_FILE).write_text(json.dumps(memory, indent=1), encoding="utf-8")
            print(
                "bytes per rank (largest): "
                + ", ".join(f"{k} {memory[k + '_mib']:.2f} MiB" for k in names),
                flush=True,
            )

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> float:
        """Average the gradients over the mesh, clip to the global norm (returned), and sum
        the router loads so every rank's bias update sees the global load."""
        self.reducer.finish()  # the buckets started during the backward
        norm = clip_grad_norm(model, max_norm, self.mesh)
        all_reduce_router_loads(model, self.mesh)
        return norm

    def save(self, run_dir: str | Path, model: nn.Module, optimizer, state: dict) -> Path:
        """Sharded: every rank writes its own shards. Consolidated: the experts and their
        moments (under FSDP every shard) gathered; rank 0 writes the checkpoint."""
        return save_on_mesh(run_dir, model, optimizer, state, self.mesh)

    def load(self, run_dir: str | Path, model: nn.Module, optimizer) -> dict:
        """Sharded: every rank reads its own chunks. Consolidated: every rank reads the full
        checkpoint and keeps its part of each tensor."""
        return load_on_mesh(run_dir, model, optimizer, self.mesh)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block (e.g. writes the run's data) before the other ranks do
        (they then read what it wrote)."""
        if not self.is_main:
            dist.barrier(group=self.mesh.world_group)
            yield
            return
        try:
            yield
        finally:
            dist.barrier(group=self.mesh.world_group)


class FSDPRun(DistributedRun):
    """DistributedRun with every weight, gradient and AdamW moment sharded (FSDP2 on top of
    the EP x DP layout, parallel/fsdp.py). Batches, means and flags are DistributedRun's;
    gradients are reduce-scattered by FSDP during the backward; a fresh model is built on
    the meta device and only this rank's shards are initialised (parallel/meta.py);
    checkpoints are sharded by default, consolidated (gathered while saving) on request,
    and either resumes at any layout."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return fully_shard_model(parallelize(model, self.mesh), self.mesh)

    def no_sync(self):
        """FSDP reduce-scatters every micro-batch's gradients into the sharded ones, where
        they accumulate: nothing to pause (and no unsharded gradients held meanwhile)."""
        return contextlib.nullcontext()

    def build(self, config) -> nn.Module:
        return sharded_transformer(config, self.mesh)

    def reduce_and_clip(self, model: nn.Module, max_norm: float) -> float:
        norm = reduce_and_clip_sharded(model, max_norm, self.mesh)
        all_reduce_router_loads(model, self.mesh)
        return norm


Run = LocalRun | DistributedRun | FSDPRun
MEMORY_FILE = "memory.json"


def run_on(mesh: ParallelMesh | None) -> Run:
    """The Run for a mesh: LocalRun for None (one process), FSDPRun for a mesh with fsdp
    set, else DistributedRun. A mesh without a checkpoint_format gets sharded checkpoints
    under FSDP, consolidated ones otherwise."""
    if mesh is None:
        return LocalRun()
    if mesh.checkpoint_format not in (None, "sharded", "consolidated"):
        raise ValueError(
            f"unknown checkpoint format {mesh.checkpoint_format!r}; choose sharded or consolidated"
        )
    if mesh.checkpoint_format is None:
        mesh = dataclasses.replace(
            mesh, checkpoint_format="sharded" if mesh.fsdp else "consolidated"
        )
    return FSDPRun(mesh) if mesh.fsdp else DistributedRun(mesh)


LOCAL_RUN = LocalRun()
