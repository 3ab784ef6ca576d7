"""Whole experts from their expert-parallel shards, and back: what a consolidated
checkpoint under expert parallelism needs (moekit.checkpoint.gathered writes and reads it).

A consolidated checkpoint written at EP size n holds every expert (E, ...) exactly as a
single process would write it, so it loads at any EP size, 1 included. Saving all-gathers
each layer's expert slices over the EP group (every rank then holds the full model for the
moment of the save; the sharded layout avoids that for larger models); loading reads the
full tensors and keeps this rank's slice.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..experts import GroupedExperts
from ..moe import MoE
from .all_to_all import ExpertParallelExperts


def _gather_experts(t_L: Tensor, group) -> Tensor:
    parts = [torch.empty_like(t_L) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t_L.contiguous(), group=group)
    return torch.cat(parts)


def _sharded_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MoE) and isinstance(m.experts, ExpertParallelExperts)
    ]


@contextlib.contextmanager
@torch.no_grad()
def consolidated(model: nn.Module):
    """Inside the block the model holds full (unsharded) experts; load or save it there.

    On exit each rank copies its slice of the (possibly just loaded) full weights back into
    its shards. Collective: every rank of the EP group must enter it together.
    """
    layers = _sharded_layers(model)
    shards = {}
    for _, layer in layers:
        shard = layer.experts
        full = GroupedExperts(
            shard.num_global_experts,
            shard.d_model,
            shard.d_hidden,
            shard.activation,
            bias=shard.b_up is not None,
        ).to(shard.w_up.device)
        for param in shard.sharded_names:
            getattr(full, param).copy_(_gather_experts(getattr(shard, param), shard.ep_group))
        shards[layer], layer.experts = shard, full
    try:
        yield model
    finally:
        for layer, shard in shards.items():
            full = layer.experts
            rows = slice(shard.first_expert, shard.first_expert + shard.num_experts)
            for param in shard.sharded_names:
                getattr(shard, param).copy_(getattr(full, param)[rows])
            layer.experts = shard


def _expert_names(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {
        f"{name}.experts.{param}": layer.experts
        for name, layer in _sharded_layers(model)
        for param in layer.experts.sharded_names
    }


def full_optimizer_tensors(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """optimizer_tensors() of a sharded model with every expert moment gathered (E, ...)."""
    experts = _expert_names(model)
    full = {}
    for key, value in tensors.items():
        shard = experts.get(key.rsplit(".", 1)[0])
        full[key] = (
            value if shard is None or value.dim() == 0 else _gather_experts(value, shard.ep_group)
        )
    return full


def shard_optimizer_tensors(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Inverse of full_optimizer_tensors: keep this rank's experts of each saved moment."""
    experts = _expert_names(model)
    sharded = {}
    for key, value in tensors.items():
        shard = experts.get(key.rsplit(".", 1)[0])
        if shard is not None and value.dim() > 0:
            value = value[shard.first_expert : shard.first_expert + shard.num_experts]
        sharded[key] = value.contiguous()
    return sharded
