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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .all_to_all import ExpertParallelExperts
from .global_view import expert_owners
from .mesh import ParallelMesh


def fully_shard_model(
    model: nn.Module, mesh: ParallelMesh, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard a parallelized model with FSDP2 (module docstring); changed in place.

    Args:
        model: the output of parallelize(); a Transformer (its `layers` and `mtp` modules
            become FSDP units).
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
    # The decoder's blocks, then its multi-token-prediction modules (models/mtp.py).
    for block in [*getattr(model, "layers", []), *getattr(model, "mtp", [])]:
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


# Checkpoints: the consolidated layout (moekit.checkpoint.gathered: every tensor whole, as
# one process writes it), so a run saved under FSDP x EP resumes at any layout, one process
# included. Saving gathers each tensor (FSDP shards, then the EP group's expert slices) on
# every rank for the moment of the save; loading keeps this rank's shard of each.


def _gather(t: Tensor, owner: ExpertParallelExperts | None) -> Tensor:
    """A sharded tensor made whole: FSDP's shards, then the EP group's expert slices."""
    if hasattr(t, "full_tensor"):
        full = t.full_tensor()
        # The gather may still be in flight (an AsyncCollectiveTensor): wait, and own it.
        full = (full.wait() if hasattr(full, "wait") else full).clone()
    else:
        full = t.detach()
    if owner is None or full.dim() == 0:
        return full
    parts = [torch.empty_like(full) for _ in range(owner.ep)]
    dist.all_gather(parts, full.contiguous(), group=owner.ep_group)
    return torch.cat(parts)


def _scatter(full: Tensor, like: Tensor, owner: ExpertParallelExperts | None) -> Tensor:
    """This rank's part of a whole tensor, shaped and placed like `like` (a DTensor shard)."""
    if owner is not None and full.dim() > 0:
        full = full[owner.first_expert : owner.first_expert + owner.num_experts]
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded state. After a forward without backward (an
    evaluation) the root keeps its weights gathered, and its attributes then point at the
    gathered buffers, which FSDP frees later: never read or write those."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole (collective), and the persistent buffers."""
    reshard(model)
    owners = expert_owners(model)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    state = {name: _gather(p, owners.get(name)) for name, p in params.items()}
    for name, value in model.state_dict().items():
        if name not in params:  # persistent buffers (never sharded)
            state[name] = value.detach()
    return state


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy whole tensors (full_state's, or a one-process checkpoint's) into the shards."""
    reshard(model)
    owners = expert_owners(model)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    for name, value in state.items():
        if name in params:
            local = _scatter(value, params[name], owners.get(name))
            _local(params[name]).copy_(_local(local))
    buffers = {k: v for k, v in state.items() if k not in params}
    model.load_state_dict(buffers, strict=False)


@torch.no_grad()
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """AdamW moments whole, named "{param}.{exp_avg|exp_avg_sq|step}" (moekit.checkpoint's)."""
    reshard(model)
    owners = expert_owners(model)
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            whole = _gather(value, owners.get(name)) if isinstance(value, Tensor) else value
            tensors[f"{name}.{key}"] = torch.as_tensor(whole).detach().cpu().contiguous()
    return tensors


@torch.no_grad()
def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]
) -> None:
    """Inverse of full_optimizer_state: each parameter's moments as its own shards."""
    reshard(model)
    owners = expert_owners(model)
    params = dict(model.named_parameters())
    unknown = sorted({key.rsplit(".", 1)[0] for key in tensors} - set(params))
    if unknown:
        raise KeyError(f"optimizer state for unknown parameters {unknown[:3]}")
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        param = params[name]
        if value.dim() == 0:  # the step count
            optimizer.state[param][field] = value.clone()
        else:
            optimizer.state[param][field] = _scatter(value, param, owners.get(name))
