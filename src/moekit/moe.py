"""The MoE layer: route, apply capacity, dispatch, run the experts, combine.

# T tokens, D model, E experts, K top_k, R routed rows
Data flow (token choice):
    x_TD --router--> (weights_TK, ids_TK) --capacity--> kept_TK
         --dispatch (argsort by expert, gather)--> x_RD grouped by expert
         --experts (one grouped MLP over E groups)--> y_RD
         --combine (weights, gather back, sum over K)--> y_TD  (+ shared experts)
Expert choice and Soft MoE build a different plan in step 2; steps 3-5 are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import losses
from .capacity import apply_capacity
from .config import MoEConfig
from .dispatch import ExpertChoicePlan, SoftPlan, TokenChoicePlan
from .experts import MLP, GroupedExperts
from .routing import ExpertChoice, SoftAssignment, build_router
from .routing.base import TokenChoice


@dataclass
class MoEStats:
    """Per-call routing statistics; all tensors are detached (no autograd, cheap).

    tokens_per_expert: (E,) rows each expert processed (after capacity).
    dropped_fraction: share of the routed assignments that capacity dropped.
    load_cv: coefficient of variation (std / mean) of tokens_per_expert.
    router_entropy: mean per-token entropy of the router distribution (nats).
    balance_loss, z_loss, importance_loss, load_loss: the unweighted loss parts.
    capacity: slots per expert, or None when dropless.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    load_cv: Tensor
    router_entropy: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    importance_loss: Tensor
    load_loss: Tensor
    capacity: int | None


@dataclass
class MoEOutput:
    """hidden: same shape as the input; aux_loss: weighted scalar to add to the task loss."""

    hidden: Tensor
    aux_loss: Tensor
    stats: MoEStats


class MoE(nn.Module):
    """A sparse mixture-of-experts feed-forward layer.

    Args:
        config: the layer's MoEConfig.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = build_router(config)
        self.experts = GroupedExperts(
            config.num_experts, config.d_model, config.d_hidden, config.activation
        )
        self.shared = MLP(config.d_model, config.shared_hidden, config.activation) if config.shared_hidden else None
        self.shared_gate = (
            nn.Linear(config.d_model, 1, bias=False)
            if self.shared is not None and config.shared_expert_gate
            else None
        )
        # Replaces route_and_plan from outside (expert parallelism: moekit.parallel), so the
        # layer's math stays single-device: planner(layer, x) -> the same four values.
        self.planner = None

    def forward(self, x: Tensor) -> MoEOutput:
        """Args: x (..., d_model). Returns MoEOutput with hidden of the same shape."""
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"input last dimension ({x.shape[-1]}) must equal d_model ({cfg.d_model}); "
                f"got shape {tuple(x.shape)}"
            )
        T = x.numel() // cfg.d_model
        if T == 0 and self.planner is None:
            # x * 0 (not zeros_like) keeps an empty batch connected to autograd.
            return MoEOutput(hidden=x * 0, aux_loss=x.new_zeros(()), stats=self._empty_stats(x))

        # 1. route, 2. plan (capacity for token choice)
        if self.planner is None:
            x_in, routing, plan, capacity = self.route_and_plan(x)
        else:
            x_in, routing, plan, capacity = self.planner(self, x)

        # 3. dispatch, 4. experts, 5. combine
        x_RD = plan.dispatch(x_in)
        y_RD = self.experts(x_RD, plan.counts_E)
        y = plan.combine(y_RD).reshape(x.shape)
        if T == 0:  # an empty rank under a planner still took part in the exchange above
            return MoEOutput(hidden=y.to(x.dtype), aux_loss=x.new_zeros(()), stats=self._empty_stats(x))

        # 6. shared experts
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared

        aux_loss, stats = self._losses_and_stats(routing, plan, capacity)
        return MoEOutput(hidden=y.to(x.dtype), aux_loss=aux_loss, stats=stats)

    def route_and_plan(self, x: Tensor):
        """Steps 1-2 on this process's tokens: route, apply capacity, build the plan.

        Returns:
            (x_in, routing, plan, capacity): the plan's input (x_TD, or x_BND for Soft MoE),
            the router's decision, the dispatch plan and the capacity (None when dropless).
        """
        cfg = self.config
        x_TD = x.reshape(-1, cfg.d_model)
        T = x_TD.shape[0]
        capacity = cfg.capacity(T)
        if cfg.router == "soft":
            # Soft MoE mixes the tokens of one sequence: (B, N, D), or one sequence if 2-D.
            x_in = x if x.dim() >= 3 else x.unsqueeze(0)
            x_in = x_in.reshape(-1, x_in.shape[-2], cfg.d_model)
            routing = self.router(x_in)
            plan = SoftPlan(routing, cfg.num_experts)
        elif cfg.router == "expert_choice":
            x_in = x_TD
            routing = self.router(x_TD, capacity)
            plan = ExpertChoicePlan(routing, T)
        else:
            x_in = x_TD
            routing = self.router(x_TD)
            ids_TK, weights_TK, kept_TK = routing.ids_TK, routing.weights_TK, routing.valid_TK
            if capacity is not None:
                ids_TK, weights_TK, kept_TK = apply_capacity(
                    routing, capacity, cfg.overflow, cfg.batch_priority
                )
            plan = TokenChoicePlan(ids_TK, kept_TK, weights_TK, cfg.num_experts)
        return x_in, routing, plan, capacity

    def _losses_and_stats(self, routing, plan, capacity: int | None) -> tuple[Tensor, MoEStats]:
        cfg = self.config
        counts_E = plan.counts_E.detach()
        zero = counts_E.new_zeros((), dtype=torch.float32)
        balance = z = importance = load = entropy = zero
        routed = None
        if isinstance(routing, TokenChoice):
            valid = routing.valid_TK
            routed = routing.ids_TK.numel() if valid is None else valid.sum()
            balance = losses.switch_balance_loss(routing.probs_TE, routing.ids_TK, valid)
            importance = losses.importance_loss(routing.weights_TK, routing.ids_TK, cfg.num_experts)
            load_E = routing.load_E
            if load_E is None:
                load_E = counts_E.float()
            load = losses.load_loss(load_E)
        if isinstance(routing, (TokenChoice, ExpertChoice)):
            z = losses.router_z_loss(routing.logits_TE)
            entropy = losses.router_entropy(routing.probs_TE.detach())
        elif isinstance(routing, SoftAssignment):
            z = losses.router_z_loss(routing.logits_BNS.flatten(0, 1))
            entropy = losses.router_entropy(routing.combine_BNS.detach().flatten(0, 1))
        aux = (
            cfg.balance_loss_coef * balance
            + cfg.z_loss_coef * z
            + cfg.importance_loss_coef * importance
            + cfg.load_loss_coef * load
        )
        kept = counts_E.sum()
        dropped = zero if routed is None else 1.0 - kept.float() / torch.as_tensor(routed).clamp_min(1)
        stats = MoEStats(
            tokens_per_expert=counts_E,
            dropped_fraction=dropped.detach(),
            load_cv=losses.cv_squared(counts_E.float()).sqrt(),
            router_entropy=entropy,
            balance_loss=balance.detach(),
            z_loss=z.detach(),
            importance_loss=importance.detach(),
            load_loss=load.detach(),
            capacity=capacity,
        )
        return aux, stats

    def _empty_stats(self, x: Tensor) -> MoEStats:
        zero = x.new_zeros((), dtype=torch.float32)
        return MoEStats(
            tokens_per_expert=torch.zeros(self.config.num_experts, dtype=torch.long, device=x.device),
            dropped_fraction=zero, load_cv=zero, router_entropy=zero, balance_loss=zero,
            z_loss=zero, importance_loss=zero, load_loss=zero, capacity=self.config.capacity(0),
        )

    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """Aux-loss-free balancing step for the sigmoid_topk router (no-op for others)."""
        update = getattr(self.router, "update_bias", None)
        if update is not None:
            update(load_E)


def update_router_biases(model: nn.Module) -> None:
    """Call after optimizer.step(): aux-loss-free bias update for every MoE in `model`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias()
