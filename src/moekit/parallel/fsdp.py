"""Fully sharded data parallelism (FSDP2) composed with expert parallelism.

    model = parallelize(Transformer(config), mesh)   # experts sliced over the EP group
    model = fully_shard_model(model, mesh)           # then everything sharded (FSDP2)
    loss.backward()
    norm = reduce_and_clip_sharded(model, max_norm, mesh)
    optimizer.step()

The layout torchtitan uses: every non-expert parameter (embeddings, attention, norms,
routers, shared experts) is sharded over the whole world (one FSDP unit per block, plus
the root for the embeddings and head); each rank's slice of the experts (EP) is sharded
again over its data-parallel group, the ranks that hold the same experts. So a rank keeps
1/W of the non-expert weights and 1/W of the experts, and the same of their gradients and
AdamW moments. FSDP gathers a block's weights just before its forward and backward and
frees them after, and reduce-scatters the gradients during the backward (overlapped with
the rest of the backward).

Gradients: FSDP averages each unit's gradient over its own mesh. For the non-expert
weights that is the world, as sync_gradients does. The experts' gradients already hold
every token of the EP group (the all-to-all backward brought them), so the world mean is
their sum over the DP group / W: FSDP's DP mean / ep, which reduce_and_clip_sharded
applies (gloo has no pre-multiplied sum, so the division is a separate step). Clipping uses
the global norm: every element lives on exactly one rank, so the sum of squares of the
local shards, summed over the world, is the single-process norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .all_to_all import ExpertParallelExperts
from .mesh import ParallelMesh


def fully_shard_model(
    model: nn.Module, mesh: ParallelMesh, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard a parallelized model with FSDP2 (module docstring); changed in place.

    Args:
        model: the output of parallelize(); a Transformer (its `layers` become FSDP units).
        mesh: the EP x DP mesh.
        param_dtype: compute dtype of the gathered weights (torch.bfloat16 for mixed
            precision: parameters gathered in bf16, gradients reduced in fp32); None keeps
            the parameters' dtype.
    Returns:
        The same model, its parameters now DTensors sharded on dim 0.
    """
    device_type = mesh.device.type
    world = DeviceMesh.from_group(mesh.world_group, device_type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if mesh.ep > 1:
        dp = DeviceMesh.from_group(mesh.dp_group, device_type)
        for module in model.modules():
            if isinstance(module, ExpertParallelExperts):
                fully_shard(module, mesh=dp, mp_policy=policy)
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=world, mp_policy=policy)
    fully_shard(model, mesh=world, mp_policy=policy)
    return model


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def reduce_and_clip_sharded(model: nn.Module, max_norm: float, mesh: ParallelMesh) -> float:
    """After backward on a fully_shard_model: finish the expert gradients' mean, clip the
    global norm to max_norm (0 = no clipping), return the norm before clipping."""
    if mesh.ep > 1:
        for module in model.modules():
            if isinstance(module, ExpertParallelExperts):
                for p in module.parameters():
                    if p.grad is not None:
                        _local(p.grad).div_(mesh.ep)
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for g in grads:
        sq += g.double().square().sum()
    dist.all_reduce(sq, group=mesh.world_group)
    total = sq.sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(total)


def sharded_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """This rank's bytes of parameters, gradients and optimizer state (local shards)."""
    params = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    grads = sum(
        _local(p.grad).numel() * p.grad.element_size()
        for p in model.parameters()
        if p.grad is not None
    )
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            for value in per_param.values():
                if isinstance(value, Tensor) and value.dim() > 0:
                    state += _local(value).numel() * value.element_size()
    return {"parameters": params, "gradients": grads, "optimizer": state}
