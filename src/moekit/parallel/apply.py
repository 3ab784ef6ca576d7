"""Apply expert x data parallelism to a model from outside, and reduce its gradients.

Gradient reduction (every rank computes the mean loss of its own, equally sized batch; the
step must see the mean over all W = dp * ep ranks, exactly as DDP gives it):
- non-expert weights (attention, norms, embeddings, routers, shared experts) are replicated
  on every rank: sum over the world group, divide by W.
- expert weights live on one rank per EP group, and the all-to-all backward already brought
  them the gradient of every token of the EP group: sum over the DP group only (the
  replicas of the same experts), then divide by W. Summing over the world too would add
  the EP group's contribution ep times (the "doubled gradients under EP" failure).
sync_gradients does both as one flat all-reduce per group after backward; data_parallel()
instead lets DDP reduce the replicated weights during the backward, in buckets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..moe import MoE
from .all_to_all import ExpertParallelExperts
from .mesh import ParallelMesh, mesh_from_device_mesh
from .planner import GroupPlanner


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """Shard every MoE layer's experts over mesh.ep_group and plan routing group-wide.

    Every rank must build the same model (same seed) first; weights are then broadcast from
    world rank 0, so the replicas start equal whatever the seeds were (a model on the meta
    device has no values to broadcast: parallel/meta.py initialises it from the seed later).

    Args:
        model: any module holding MoE layers with GroupedExperts; changed in place.
        mesh: a ParallelMesh (init_parallel / build_mesh), or a torch DeviceMesh with
            dims ("dp", "ep").
    Returns:
        The same model.
    """
    if not isinstance(mesh, ParallelMesh):
        mesh = mesh_from_device_mesh(mesh)
    _broadcast_weights(model, mesh.world_group)
    if mesh.ep == 1:
        return model
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if not getattr(module.experts, "plain_weights", False):
            raise ValueError(
                f"{name}: expert parallelism needs GroupedExperts, not "
                f"{type(module.experts).__name__}"
            )
        module.experts = ExpertParallelExperts(module.experts, mesh.ep_group)
        module.planner = GroupPlanner(mesh.ep_group)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights (empty when ep == 1)."""
    return [
        p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()
    ]


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    experts = {id(p) for p in expert_parameters(model)}
    params = list(model.parameters())
    return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]


@torch.no_grad()
def _broadcast_weights(model: nn.Module, group) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:  # a meta model gets equal values from its seed (meta.py)
            dist.broadcast(tensor.data, src=0, group=group)


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh: ParallelMesh, *, experts_only: bool = False) -> None:
    """Average gradients as the module docstring says; call after backward, before the step.

    Args:
        experts_only: reduce the expert weights only (the model is wrapped by
            data_parallel(), whose DDP already averaged the others during backward).
    """
    replicated, experts = _split_parameters(model)
    if not experts_only:
        _reduce(replicated, mesh.world_group, mesh.world_size, mesh.device)
    _reduce(experts, mesh.dp_group, mesh.world_size, mesh.device)


def data_parallel(model: nn.Module, mesh: ParallelMesh, **ddp_options) -> DistributedDataParallel:
    """Wrap a parallelized model in DDP over the world group, expert weights left out.

    DDP averages the replicated weights' gradients in buckets that overlap the backward;
    the expert weights are DDP-ignored and reduce over their DP group only: call
    sync_gradients(wrapped.module, mesh, experts_only=True) after backward.

    Args:
        model: the output of parallelize().
        ddp_options: passed to DistributedDataParallel (broadcast_buffers defaults to
            False: the sigmoid router's bias is kept equal by all_reduce_router_loads).
    """
    experts = {id(p) for p in expert_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) in experts]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp_options.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(model, process_group=mesh.world_group, **ddp_options)


def _reduce(params: list[nn.Parameter], group, divisor: int, device: torch.device) -> None:
    """Sum grads over group, divide by divisor; a grad missing on some ranks counts as 0."""
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)  # params nobody touched keep grad None
    used = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    if not used:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    flat = torch.cat([g.flatten().float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    for p, chunk in zip(used, flat.split([p.numel() for p in used])):
        p.grad = chunk.view_as(p).to(p.dtype)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, mesh: ParallelMesh) -> float:
    """Global gradient norm over the whole (unsharded) model; clip to max_norm if > 0.

    Replicated gradients count once, expert shards are summed over the EP group, so every
    rank gets the norm the single-process model would and applies the same scale.
    """
    replicated, experts = _split_parameters(model)
    sq = _sum_of_squares(replicated, mesh.device)
    sq_experts = _sum_of_squares(experts, mesh.device)
    dist.all_reduce(sq_experts, group=mesh.ep_group)
    total = (sq + sq_experts).sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in [*replicated, *experts]:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    return float(total)


def _sum_of_squares(params: list[nn.Parameter], device: torch.device) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([g.double().square().sum() for g in grads]).sum()


@torch.no_grad()
def all_reduce_router_loads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Sum the sigmoid router's counted loads over all ranks before update_bias().

    Every rank then moves its bias by the same sign(mean - load) of the whole global batch,
    so the (replicated) biases stay equal and match the single-process update.
    """
    loads = [
        m.router.load_since_update
        for m in model.modules()
        if isinstance(m, MoE) and hasattr(m.router, "load_since_update")
    ]
    if not loads:
        return
    flat = torch.cat(loads)
    dist.all_reduce(flat, group=mesh.world_group)
    for load, chunk in zip(loads, flat.split([t.numel() for t in loads])):
        load.copy_(chunk)
