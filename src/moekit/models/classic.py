"""Classic mixtures of experts for classification: Jacobs et al. 1991 and the hierarchy of
Jordan & Jacobs 1994, built from the library's MoE layer.

# B examples, I input features, D model width, C classes, E experts, G groups

Every classifier here is embed (I -> D) -> mixture (D -> D) -> head (D -> C). The head is
linear, so mixing the experts' D-wide outputs and then applying the head equals mixing
the experts' class logits: head(sum_e g_e f_e(x)) = sum_e g_e head(f_e(x)) (bias aside).
Each expert with the shared head is therefore a small classifier of its own, and the gate
mixes their logits, as in the 1991 mixture (which mixes the experts' predictions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import ModuleExperts
from ..moe import MoE, MoEOutput, MoEStats
from ..routing import router_class
from ..routing.base import ExpertChoice, SoftAssignment, TokenChoice


@dataclass
class TaskOutput:
    """prediction: logits (B, C) or regression outputs (B, tasks); aux_loss: weighted
    scalar to add to the task loss; stats: one MoEStats per MoE layer that ran."""

    prediction: Tensor
    aux_loss: Tensor
    stats: list[MoEStats]


class GateChoice(NamedTuple):
    """The expert each example (or token) weights most, for label x expert tables.

    ids: long, leading dimension B (one id per example, or (B, N) per token);
    num_experts: how many experts the gate chooses among.
    """

    ids: Tensor
    num_experts: int


def first_choice(routing: TokenChoice | ExpertChoice | SoftAssignment, num_experts: int) -> Tensor:
    """Per token, the expert its router ranks first (before capacity).

    Returns (T,) for token and expert choice, (B, N) for Soft MoE (the expert owning the
    slot with the largest combine weight).
    """
    if isinstance(routing, TokenChoice):
        return routing.rank_TE.argmax(dim=-1)
    if isinstance(routing, ExpertChoice):
        return routing.probs_TE.argmax(dim=-1)
    slots_per_expert = routing.combine_BNS.shape[-1] // num_experts
    return routing.combine_BNS.argmax(dim=-1) // slots_per_expert


def expert_mlp(d_model: int, width: int) -> nn.Sequential:
    """One classic expert: D -> width -> D with a ReLU, biases on both layers."""
    return nn.Sequential(nn.Linear(d_model, width), nn.ReLU(), nn.Linear(width, d_model))


class ModuleMoE(MoE):
    """The MoE layer with heterogeneous experts (any nn.Module D -> D per expert).

    Routing, capacity, dispatch, combine, losses and statistics are the MoE layer's; only
    the experts differ (ModuleExperts, a loop over modules). config.d_hidden is unused.

    Args:
        config: the layer's MoEConfig; num_experts must equal len(experts).
        experts: one module per expert, each mapping (R, D) -> (R, D).
    """

    def __init__(self, config: MoEConfig, experts: list[nn.Module]):
        if len(experts) != config.num_experts:
            raise ValueError(
                f"got {len(experts)} expert modules for num_experts ({config.num_experts})"
            )
        super().__init__(config)
        self.experts = ModuleExperts(experts)


def _check_router(router: str) -> None:
    # Soft MoE mixes the examples of a batch into slots: an example's prediction would
    # depend on the other examples, which is not a classifier of single inputs.
    if router_class(router).mixes_tokens:
        raise ValueError("router 'soft' mixes the examples of a batch; use it in the ViT")


class MoEClassifier(nn.Module):
    """Classic gated MoE classifier: embed, a mixture of heterogeneous MLP experts, head.

    Args:
        in_features, num_classes: I and C.
        d_model: D, the width the gate and the experts see.
        expert_widths: hidden width of each expert (E = len(expert_widths)).
        router: any router but soft; "dense" is the 1991 form (every expert, softmax mix).
        top_k: experts per example for sparse routers.
        balance_loss_coef: Switch load-balancing coefficient (no effect with "dense").
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        d_model: int = 64,
        expert_widths: tuple[int, ...] = (16, 32, 48, 64),
        router: str = "dense",
        top_k: int = 1,
        balance_loss_coef: float = 0.01,
    ):
        super().__init__()
        _check_router(router)
        config = MoEConfig(
            d_model=d_model,
            d_hidden=max(expert_widths),
            num_experts=len(expert_widths),
            top_k=top_k,
            router=router,
            balance_loss_coef=balance_loss_coef if router_class(router).sparse else 0.0,
        )
        self.embed = nn.Sequential(nn.Linear(in_features, d_model), nn.ReLU())
        self.moe = ModuleMoE(config, [expert_mlp(d_model, w) for w in expert_widths])
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x_BI: Tensor) -> TaskOutput:
        out = self.moe(self.embed(x_BI))
        return TaskOutput(self.head(out.hidden), out.aux_loss, [out.stats])

    @torch.no_grad()
    def gate_choices(self, x_BI: Tensor) -> dict[str, GateChoice]:
        """The expert the gate ranks first for each example."""
        routing = self.moe.router(self.embed(x_BI))
        E = self.moe.config.num_experts
        return {"experts": GateChoice(first_choice(routing, E), E)}


class DenseClassifier(nn.Module):
    """The single-network baseline: embed, one MLP of the given width, head.

    With width = the sum of a dense-gated mixture's expert widths it does the same
    multiply-adds per example as that mixture (minus the D x E gate).
    """

    def __init__(self, in_features: int, num_classes: int, *, d_model: int = 64, width: int = 160):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, d_model), nn.ReLU())
        self.mlp = expert_mlp(d_model, width)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x_BI: Tensor) -> TaskOutput:
        logits = self.head(self.mlp(self.embed(x_BI)))
        return TaskOutput(logits, logits.new_zeros(()), [])

    def gate_choices(self, x_BI: Tensor) -> dict[str, GateChoice]:
        return {}


class _Group(nn.Module):
    """A gated MoE used as one expert of the upper gate (its rows in, its mixture out)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.moe = MoE(config)

    def forward(self, x_RD: Tensor) -> Tensor:
        return self.moe(x_RD).hidden


class HierarchicalMoE(nn.Module):
    """Jordan & Jacobs (1994): a gate over G groups, each group a dense-gated MoE.

    The upper gate may be any token-choice router (dense is the paper's form); each group
    mixes all its experts with its own softmax gate, so the group's balancing losses
    would be constant and are not computed. The output of one example is
    sum_g g_g(x) sum_e g_{e|g}(x) f_{g,e}(x).

    Args:
        d_model: D.
        num_groups, experts_per_group, expert_hidden: G, experts in each group, and the
            hidden width of every expert (ReLU MLPs from the grouped-experts class).
        router, top_k, balance_loss_coef: the upper gate's settings.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_groups: int = 2,
        experts_per_group: int = 2,
        expert_hidden: int = 40,
        router: str = "dense",
        top_k: int = 1,
        balance_loss_coef: float = 0.01,
    ):
        super().__init__()
        _check_router(router)
        group_config = MoEConfig(
            d_model=d_model,
            d_hidden=expert_hidden,
            num_experts=experts_per_group,
            router="dense",
            activation="relu",
            balance_loss_coef=0.0,
        )
        upper = MoEConfig(
            d_model=d_model,
            d_hidden=expert_hidden,
            num_experts=num_groups,
            top_k=top_k,
            router=router,
            balance_loss_coef=balance_loss_coef if router_class(router).sparse else 0.0,
        )
        self.upper = ModuleMoE(upper, [_Group(group_config) for _ in range(num_groups)])

    @property
    def groups(self) -> list[MoE]:
        """The lower-level MoE layers, one per group."""
        return [group.moe for group in self.upper.experts.experts]

    def forward(self, x_TD: Tensor) -> MoEOutput:
        return self.upper(x_TD)

    @torch.no_grad()
    def gate_choices(self, h_TD: Tensor) -> dict[str, GateChoice]:
        """First choices of the upper gate ("groups"), and the leaf expert with the largest
        path weight g_g(x) * g_{e|g}(x) ("leaves", numbered g * experts_per_group + e)."""
        routing = self.upper.router(h_TD)
        G = self.upper.config.num_experts
        inner_TGE = torch.stack([group.router(h_TD).probs_TE for group in self.groups], dim=1)
        path_TGE = routing.probs_TE.unsqueeze(-1) * inner_TGE
        return {
            "groups": GateChoice(first_choice(routing, G), G),
            "leaves": GateChoice(path_TGE.flatten(1).argmax(dim=-1), path_TGE[0].numel()),
        }


class HierarchicalClassifier(nn.Module):
    """embed -> HierarchicalMoE -> head; see MoEClassifier for the arguments' meaning."""

    def __init__(self, in_features: int, num_classes: int, *, d_model: int = 64, **hme_options):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, d_model), nn.ReLU())
        self.hme = HierarchicalMoE(d_model, **hme_options)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x_BI: Tensor) -> TaskOutput:
        out = self.hme(self.embed(x_BI))
        return TaskOutput(self.head(out.hidden), out.aux_loss, [out.stats])

    def gate_choices(self, x_BI: Tensor) -> dict[str, GateChoice]:
        return self.hme.gate_choices(self.embed(x_BI))
