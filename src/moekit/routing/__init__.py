"""Routers by name. Adding one means one class here and one test file."""

from __future__ import annotations

from torch import nn

from ..config import MoEConfig
from .base import ExpertChoice, LossParts, Router, SoftAssignment, TokenChoice
from .expert_choice import ExpertChoiceRouter
from .noisy import NoisyTopK
from .sigmoid import SigmoidTopK
from .soft import SoftRouter
from .softmax import Dense, GShardTop2, SoftmaxTopK, Switch, TopP

ROUTER_CLASSES: dict[str, type[nn.Module]] = {
    "softmax_topk": SoftmaxTopK,
    "noisy_topk": NoisyTopK,
    "switch": Switch,
    "gshard": GShardTop2,
    "sigmoid_topk": SigmoidTopK,
    "top_p": TopP,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
    "dense": Dense,
}


def router_class(name: str) -> type[nn.Module]:
    """The class of the router named `name`; its class attributes say what it is."""
    if name not in ROUTER_CLASSES:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTER_CLASSES)}")
    return ROUTER_CLASSES[name]


def build_router(config: MoEConfig) -> nn.Module:
    """The router module named by config.router."""
    return ROUTER_CLASSES[config.router](config)


__all__ = [
    "ROUTER_CLASSES",
    "Dense",
    "ExpertChoice",
    "ExpertChoiceRouter",
    "GShardTop2",
    "LossParts",
    "NoisyTopK",
    "Router",
    "SigmoidTopK",
    "SoftAssignment",
    "SoftRouter",
    "SoftmaxTopK",
    "Switch",
    "TokenChoice",
    "TopP",
    "build_router",
    "router_class",
]
