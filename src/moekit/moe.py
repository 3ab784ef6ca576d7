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
from .activations import resolve_activation
from .config import MoEConfig
from .dispatch import build_plan
from .experts import MLP, GroupedExperts
from .routing import build_router

# A call with at most this many assignment rows (tokens * top_k) gathers each token's
# experts instead of dispatching (inference only; see MoE.gathers_experts). Measured on a
# tiny Mixtral's decode step, two threads (bench/generate.py --threshold,
# docs/benchmarks.md, "Decoding"): faster at 2, 4 and 8 rows (batch 1, 2, 4 with top-2),
# eager and compiled; at 16 rows slower eager, level compiled.
SMALL_BATCH_ROWS = 8


@dataclass
class MoEStats:
    """Per-call routing statistics; all tensors are detached (no autograd, cheap).

    tokens_per_expert: (E,) rows each expert processed (after capacity).
    dropped_fraction: share of the routed assignments that capacity dropped.
    load_cv: coefficient of variation (std / mean) of tokens_per_expert.
    router_entropy: mean per-token entropy of the router distribution (nats).
    balance_loss, z_loss, importance_loss, load_loss: the unweighted loss parts.
    capacity: slots per expert, or None when dropless.
    balance_scope: the tokens the balance losses counted over (MoEConfig.balance_scope);
        "global" without a step reference is the call's own tokens (the call is the step).
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
    balance_scope: str = "micro_batch"


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
        # resolved once, shared by the routed and the shared experts
        activation = resolve_activation(config.activation, config.swiglu_alpha, config.swiglu_limit)
        self.experts = GroupedExperts(
            config.num_experts,
            config.d_model,
            config.d_hidden,
            activation,
            backend=config.expert_backend,
            bias=config.expert_bias,
        )
        self.shared = (
            MLP(config.d_model, config.shared_hidden, activation) if config.shared_hidden else None
        )
        self.shared_gate = (
            nn.Linear(config.d_model, 1, bias=False)
            if self.shared is not None and config.shared_expert_gate
            else None
        )
        # Replaces route_and_plan from outside (expert parallelism: moekit.parallel), so the
        # layer's math stays single-device: planner(layer, x) -> the same four values.
        self.planner = None
        # Replaces a token-choice decision from outside (routing replay and recording:
        # moekit.traces): routing_hook(layer, decision) -> the decision the layer uses.
        self.routing_hook = None
        # The global balance scope (losses.py, "Scopes"; set by train/accumulation.py):
        # while counting_balance, each forward adds its tokens' balance_sums to
        # balance_totals; while balance_reference_on, the losses use balance_reference,
        # the (4, E) means of the whole optimizer step. Buffers (not persistent): updated
        # in place, so a compiled forward reads new values without recompiling.
        E = config.num_experts
        self.register_buffer("balance_totals", torch.zeros(4, E), persistent=False)
        self.register_buffer("balance_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("balance_reference", torch.zeros(4, E), persistent=False)
        for buffer in (self.balance_totals, self.balance_tokens, self.balance_reference):
            buffer.zero_()  # an initialiser a meta-device build records (parallel/meta.py)
        self.counting_balance = False
        self.balance_reference_on = False

    def forward(self, x: Tensor) -> MoEOutput:
        """Args: x (..., d_model). Returns MoEOutput with hidden of the same shape."""
        cfg = self.config
        if not x.is_floating_point():
            raise TypeError(
                f"MoE input must be floating point (hidden states), got dtype {x.dtype}; "
                "embed token ids first"
            )
        if x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"input last dimension ({x.shape[-1]}) must equal d_model ({cfg.d_model}); "
                f"got shape {tuple(x.shape)}"
            )
        T = x.numel() // cfg.d_model
        if T == 0 and self.planner is None:
            # x * 0 (not zeros_like) keeps an empty batch connected to autograd.
            return MoEOutput(hidden=x * 0, aux_loss=x.new_zeros(()), stats=self._empty_stats(x))

        # 1. route, 2. plan (capacity for token choice); none for the small-batch path
        if self.planner is not None:
            x_in, routing, plan, capacity = self.planner(self, x)
        elif self.gathers_experts(T):
            x_in, routing, plan, capacity = x, self.route(x, None), None, None
        else:
            x_in, routing, plan, capacity = self.route_and_plan(x)

        # 3. dispatch, 4. experts, 5. combine; or each token's own experts, gathered
        if plan is None:
            ids_TK, weights_TK = routing.ids_TK, routing.weights_TK
            y = self.experts.forward_gathered(x.reshape(T, -1), ids_TK, weights_TK)
            y = y.reshape(x.shape)
            counts_E = losses.expert_counts(ids_TK, cfg.num_experts, routing.valid_TK)
        else:
            x_RD = plan.dispatch(x_in)
            y_RD = self.experts(x_RD, plan.counts_E)
            y = plan.combine(y_RD).reshape(x.shape)
            counts_E = plan.counts_E
        if T == 0:  # an empty rank under a planner still took part in the exchange above
            return MoEOutput(
                hidden=y.to(x.dtype), aux_loss=x.new_zeros(()), stats=self._empty_stats(x)
            )

        # 6. shared experts
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared

        rows = x.shape[:-2].numel() if x.dim() > 2 else 1  # the sequences (sequence scope)
        aux_loss, stats = self._losses_and_stats(routing, counts_E, capacity, rows)
        return MoEOutput(hidden=y.to(x.dtype), aux_loss=aux_loss, stats=stats)

    def route_and_plan(self, x: Tensor):
        """Steps 1-2 on this process's tokens: route, apply capacity, build the plan.

        The router and its decision know their family (token choice, expert choice, Soft
        MoE); this method asks neither which one it holds.

        Returns:
            (x, routing, plan, capacity): the plan's input, the router's decision, the
            dispatch plan and the capacity (None when dropless).
        """
        capacity = self.config.capacity(x.numel() // self.config.d_model)
        routing = self.route(x, capacity)
        return x, routing, build_plan(routing, self.config, capacity), capacity

    def route(self, x: Tensor, capacity: int | None):
        """Step 1: the router's decision for x, passed through routing_hook when one is set."""
        routing = self.router.route(x, capacity)
        if self.routing_hook is not None:
            routing = self.routing_hook(self, routing)
        return routing

    def gathers_experts(self, num_tokens: int) -> bool:
        """Whether a call of num_tokens takes the small-batch path (`forward_gathered`).

        Only in inference (no autograd), for dropless, causal routers (token choice: a
        token's experts depend on that token alone) and experts that declare
        `plain_weights` (GroupedExperts; LoRA's adapters compute differently, and
        heterogeneous `ModuleExperts` have no 3-D weights: both keep the general path), and
        only for a few assignment rows: below SMALL_BATCH_ROWS, sorting T*K slots costs
        more than the rows themselves.
        """
        cfg = self.config
        return (
            not torch.is_grad_enabled()
            and getattr(self.experts, "plain_weights", False)
            and self.router.causal
            and cfg.capacity(num_tokens) is None
            and num_tokens * cfg.top_k <= SMALL_BATCH_ROWS
        )

    def _losses_and_stats(
        self, routing, counts_E: Tensor, capacity: int | None, rows: int = 1
    ) -> tuple[Tensor, MoEStats]:
        cfg = self.config
        counts_E = counts_E.detach()
        if self.counting_balance:
            with torch.no_grad():
                self.balance_totals += routing.balance_sums()
                self.balance_tokens += routing.probs_TE.shape[0]
        reference = self.balance_reference if self.balance_reference_on else None
        parts = routing.loss_parts(counts_E, cfg.balance_scope, rows, reference)
        aux = (
            cfg.balance_loss_coef * parts.balance
            + cfg.z_loss_coef * parts.z
            + cfg.importance_loss_coef * parts.importance
            + cfg.load_loss_coef * parts.load
        )
        kept = counts_E.sum().float()
        if parts.routed is None:
            dropped = kept.new_zeros(())
        elif isinstance(parts.routed, int):
            dropped = 1.0 - kept / max(parts.routed, 1)
        else:
            dropped = 1.0 - kept / parts.routed.clamp_min(1)
        stats = MoEStats(
            tokens_per_expert=counts_E,
            dropped_fraction=dropped.detach(),
            load_cv=losses.cv_squared(counts_E.float()).sqrt(),
            router_entropy=parts.entropy,
            balance_loss=parts.balance.detach(),
            z_loss=parts.z.detach(),
            importance_loss=parts.importance.detach(),
            load_loss=parts.load.detach(),
            capacity=capacity,
            balance_scope=cfg.balance_scope,
        )
        return aux, stats

    def _empty_stats(self, x: Tensor) -> MoEStats:
        zero = x.new_zeros((), dtype=torch.float32)
        return MoEStats(
            tokens_per_expert=torch.zeros(
                self.config.num_experts, dtype=torch.long, device=x.device
            ),
            dropped_fraction=zero,
            load_cv=zero,
            router_entropy=zero,
            balance_loss=zero,
            z_loss=zero,
            importance_loss=zero,
            load_loss=zero,
            capacity=self.config.capacity(0),
            balance_scope=self.config.balance_scope,
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
