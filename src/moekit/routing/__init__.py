"""Routers by name. Adding one means one class here and one test file."""

from __future__ import annotations

from torch import nn

from ..config import MoEConfig, register_routers
from .base import ExpertChoice, LossParts, Router, SoftAssignment, TokenChoice
from .expert_choice import ExpertChoiceRouter
from .noisy import NoisyTopK
from .sigmoid import SigmoidTopK
from .soft import SoftRouter
from .softmax import Dense, GShardTop2, SoftmaxTopK, Switch, TopP
from .sparsemixer import SparseMixer

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
    "sparsemixer": SparseMixer,
}

register_routers(ROUTER_CLASSES)  # MoEConfig checks each router's settings by its class


def router_class(name: str) -> type[nn.Module]:
    """The class of the router named `name`; its class attributes say what it is."""
    if name not in ROUTER_CLASSES:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTER_CLASSES)}")
    return ROUTER_CLASSES[name]


def build_router(config: MoEConfig) -> nn.Module:
    """The router module named by config.router (ValueError for a balance_scope it cannot
    use)."""
    cls = ROUTER_CLASSES[config.router]
    check_balance_scope(cls, config)
    return cls(config)


def check_balance_scope(cls: type[nn.Module], config: MoEConfig) -> None:
    """ValueError when config.balance_scope is not micro_batch but has nothing to scope:
    the router has no balance losses, or their coefficients are all zero."""
    scope = config.balance_scope
    if scope == "micro_batch":
        return
    if not cls.balances:
        raise ValueError(
            f"balance_scope {scope!r}: the {config.router} router has no balance loss to "
            "scope (its load is fixed by construction); use balance_scope 'micro_batch'"
        )
    coefs = ("balance_loss_coef", "importance_loss_coef", "load_loss_coef")
    if not any(getattr(config, name) > 0 for name in coefs):
        raise ValueError(
            f"balance_scope {scope!r} chooses the tokens of the balance losses, but "
            f"{', '.join(coefs)} are all 0: set balance_loss_coef (e.g. 0.01, or 1e-4 for "
            "DeepSeek-V3's sequence-wise loss beside the bias)"
        )


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
    "SparseMixer",
    "Switch",
    "TokenChoice",
    "TopP",
    "build_router",
    "router_class",
]
