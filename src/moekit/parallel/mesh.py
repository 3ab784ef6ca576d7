"""Process groups for expert x data parallelism, with timeouts; backend from the device.

World W = dp * ep ranks; rank = dp_rank * ep + ep_rank, so an expert-parallel group is ep
consecutive ranks (on one machine when ep <= GPUs per node: the all-to-all stays on the
fast links) and a data-parallel group is every ep-th rank.

    ep_group: ranks that exchange tokens; together they hold one copy of every expert.
    dp_group: ranks holding the same experts (replicas); expert gradients reduce here.
    world_group: every rank; non-expert gradients and router loads reduce here.

Every group gets the same timeout: a rank that dies or hangs makes the others' next
collective fail with an error after at most `timeout_s`, instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
CHECKPOINT_FORMATS = ("sharded", "consolidated")


@dataclass(frozen=True)
class ParallelMesh:
    """An EP x DP layout of the world and its three process groups."""

    ep: int
    dp: int
    rank: int
    ep_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    world_group: dist.ProcessGroup
    device: torch.device
    # Shard every weight, gradient and optimizer moment with FSDP2 on top of the EP x DP
    # layout (parallel/fsdp.py), instead of replicating the non-expert ones.
    fsdp: bool = False
    # How `moekit train` checkpoints on this mesh: "sharded" (torch.distributed.checkpoint,
    # every rank its own shards) or "consolidated" (rank 0 writes every tensor whole);
    # None: sharded under FSDP, consolidated otherwise (train/run.py).
    checkpoint_format: str | None = None

    @property
    def world_size(self) -> int:
        return self.ep * self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or anything setting its env vars)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_parallel(
    ep: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | None = None,
    fsdp: bool = False,
) -> ParallelMesh:
    """Join the default process group (env:// as torchrun sets it) and build the mesh.

    Args:
        ep: expert-parallel size; must divide the world size (dp = world / ep).
        timeout_s: collective timeout for every group, in seconds.
        device: this rank's device (default_device() when None); picks NCCL or gloo.
    Returns:
        The ParallelMesh.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
    device = default_device() if device is None else device
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=timeout)
    return build_mesh(ep, timeout=timeout, device=device, fsdp=fsdp)


def build_mesh(
    ep: int, *, timeout: timedelta, device: torch.device, fsdp: bool = False
) -> ParallelMesh:
    """The EP x DP groups of an initialised world (every rank must call this, in step)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"ep ({ep!r}) must be a positive divisor of the world size ({world})")
    dp = world // ep
    # new_group is collective: every rank creates every group in the same order.
    ep_group = dp_group = None
    for d in range(dp):
        group = dist.new_group([d * ep + e for e in range(ep)], timeout=timeout)
        if rank // ep == d:
            ep_group = group
    for e in range(ep):
        group = dist.new_group([d * ep + e for d in range(dp)], timeout=timeout)
        if rank % ep == e:
            dp_group = group
    world_group = dist.new_group(list(range(world)), timeout=timeout)
    return ParallelMesh(
        ep=ep,
        dp=dp,
        rank=rank,
        ep_group=ep_group,
        dp_group=dp_group,
        world_group=world_group,
        device=device,
        fsdp=fsdp,
    )


def mesh_from_device_mesh(device_mesh) -> ParallelMesh:
    """A ParallelMesh from a torch DeviceMesh with dims named ("dp", "ep").

    The DeviceMesh's own groups are used as they are (with the timeout they were made with).
    """
    names = device_mesh.mesh_dim_names
    if names is None or set(names) != {"dp", "ep"}:
        raise ValueError(f"the device mesh needs dims named ('dp', 'ep'); got {names!r}")
    ep_group, dp_group = device_mesh.get_group("ep"), device_mesh.get_group("dp")
    ep, dp = dist.get_world_size(ep_group), dist.get_world_size(dp_group)
    rank = dist.get_rank()
    if rank % ep != dist.get_rank(ep_group) or rank // ep != dist.get_rank(dp_group):
        raise ValueError("the device mesh must be laid out (dp, ep) with ep the inner dim")
    device = torch.device(device_mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return ParallelMesh(
        ep=ep,
        dp=dp,
        rank=rank,
        ep_group=ep_group,
        dp_group=dp_group,
        world_group=dist.group.WORLD,
        device=device,
    )


@contextlib.contextmanager
def training_mesh(
    ep: int | None, timeout_s: float, fsdp: bool = False, checkpoint_format: str | None = None
) -> Iterator[ParallelMesh | None]:
    """The mesh `moekit train` runs on: from torchrun's env vars, or None for one process.

    Inside the block, ranks other than 0 print nothing (rank 0 reports for all); on a
    normal exit the process group is destroyed. After an error it is left alone: a failed
    collective (a dead or hung rank) can make the teardown wait too. The trainer computes
    on the CPU, so its groups use gloo even where CUDA is present.

    Args:
        ep: the expert-parallel size (None = 1); more than 1 needs torchrun.
        timeout_s: the collective timeout of every group, in seconds.
        fsdp: shard the model with FSDP2 (needs torchrun too).
        checkpoint_format: "sharded", "consolidated", or None (sharded under FSDP); see
            ParallelMesh. One process always writes consolidated checkpoints.
    """
    if checkpoint_format not in (None, *CHECKPOINT_FORMATS):
        raise ValueError(
            f"unknown checkpoint format {checkpoint_format!r}; choose one of "
            f"{', '.join(CHECKPOINT_FORMATS)}"
        )
    if not launched_by_torchrun():
        if checkpoint_format == "sharded":
            raise ValueError(
                "--checkpoint.format sharded needs one process per rank (torchrun); "
                "one process writes consolidated checkpoints"
            )
        if fsdp:
            raise ValueError(
                "--parallel.fsdp true needs one process per rank: "
                "torchrun --nproc-per-node N -m moekit train --parallel.fsdp true ..."
            )
        if ep not in (None, 1):
            raise ValueError(
                f"--parallel.ep {ep} needs one process per rank: "
                f"torchrun --nproc-per-node {ep} -m moekit train --parallel.ep {ep} ..."
            )
        yield None
        return
    mesh = init_parallel(ep or 1, timeout_s=timeout_s, device=torch.device("cpu"), fsdp=fsdp)
    mesh = dataclasses.replace(mesh, checkpoint_format=checkpoint_format)
    with contextlib.ExitStack() as stack:
        if mesh.rank != 0:
            devnull = stack.enter_context(open(os.devnull, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        yield mesh
    dist.destroy_process_group()
