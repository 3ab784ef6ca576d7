"""This rank's tensors in one-process coordinates: the DTensors a sharded checkpoint stores
(moekit.checkpoint.sharded hands them to torch.distributed.checkpoint).

Each rank hands DCP its tensors as DTensors whose global shape is the one-process shape:
- FSDP-sharded weights and moments are already such DTensors (dim 0 split over the world);
- an expert-parallel rank's experts (E/ep, ...) become rows [ep_rank * E/ep, ...) of the
  global (E, ...) tensor: a DTensor on the (ep, dp) mesh with placements (Shard(0),
  Shard(0)) under FSDP (the EP slice, then FSDP's chunk of it over the DP group) or
  (Shard(0), Replicate()) without it (the DP replicas hold the same rows);
- a tensor every rank holds whole (replicated weights, buffers, step counts) is passed as
  it is, and DCP has one rank write it.
(torch's get_state_dict / set_state_dict would hand DCP the expert DTensors as FSDP sees
them, on the DP group with the EP slice's shape (E/ep, ...) as their global shape: every EP
rank would write different rows under the same key and offsets. Hence this mapping.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .all_to_all import ExpertParallelExperts
from .mesh import ParallelMesh


def expert_owners(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """{"{module}.{w_up|...}": its expert-parallel module} for every sharded expert tensor."""
    return {
        f"{name}.{param}": module
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for param in module.sharded_names
    }


def _ep_dp_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """The world as an (ep, dp) DeviceMesh over the mesh's own groups: rank d * ep + e at
    (e, d), so Shard(0) on dim 0 then on dim 1 is the EP slice, then its DP chunk."""
    ranks = torch.arange(mesh.world_size).view(mesh.dp, mesh.ep).t()
    return DeviceMesh.from_group(
        [mesh.ep_group, mesh.dp_group], mesh.device.type, ranks, mesh_dim_names=("ep", "dp")
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


class GlobalView:
    """Turns this rank's tensors into the one-process coordinates DCP stores.

    Args:
        model: the (parallelized, maybe fully sharded) model.
        mesh: its ranks; None: one process, every tensor is already whole.
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh | None):
        self.owners = expert_owners(model)
        self.ep_dp = _ep_dp_mesh(mesh) if mesh is not None and self.owners else None

    def __call__(self, name: str, t: Tensor) -> Tensor:
        """t: the parameter `name`, or a tensor laid out like it (an AdamW moment)."""
        owner = self.owners.get(name)
        if owner is None or t.dim() == 0:
            return t.detach()  # whole on every rank, or already a world-sharded DTensor
        local = (t.to_local() if isinstance(t, DTensor) else t).detach()
        placements = (Shard(0), Shard(0) if isinstance(t, DTensor) else Replicate())
        shape = (owner.num_global_experts, *t.shape[1:])
        return DTensor.from_local(
            local,
            self.ep_dp,
            placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_stride(shape),
        )
