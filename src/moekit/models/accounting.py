"""Parameter accounting of the decoder: total and active-per-token counts, counted on the
meta device so that a 671B configuration costs no memory and no time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..config import MoEConfig
from ..moe import MoE
from .transformer import ModelConfig, Transformer


class ParamCount(NamedTuple):
    """Parameter counts: total stored, and active (used) per token."""

    total: int
    active: int


def active_expert_fraction(moe: MoEConfig) -> float:
    """Share of the routed experts' weights one token uses, on average.

    Token choice: top_k / E (for top_p, top_k is the most a token may use, so this is an
    upper bound). Expert choice: each expert takes C = cf * T * top_k / E tokens, so a token
    is processed by cf * top_k experts on average (cf None means 1). Dense: every expert
    (top_k = E). Soft MoE: every expert, because every token's output mixes every expert's
    slots (its FLOPs per token are lower: E * slots_per_expert slots per sequence).
    """
    if moe.router == "soft":
        return 1.0
    if moe.router == "expert_choice":
        factor = 1.0 if moe.capacity_factor is None else moe.capacity_factor
        return min(1.0, factor * moe.top_k / moe.num_experts)
    return moe.top_k / moe.num_experts


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: shapes only, no memory, no initialisers run.

    Skipping torch.nn.init matters for speed alone: there are no values to set, and a
    meta normal_ imports torch._dynamo, which takes seconds.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return Transformer(config)
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def count_parameters(model_or_config: Transformer | ModelConfig) -> ParamCount:
    """Total and active-per-token parameter counts (tied embeddings counted once).

    Active = every parameter except the routed experts', plus active_expert_fraction of
    the routed experts' weights. Embedding and head count as active. A config is built on
    the meta device, so huge configs cost no memory.
    """
    model = model_or_config
    if isinstance(model, ModelConfig):
        model = meta_model(model)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (1.0 - active_expert_fraction(module.config))
    return ParamCount(total=total, active=total - round(inactive))
