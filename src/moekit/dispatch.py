"""Local dispatch: move tokens into expert-grouped rows and back.

# T tokens, D model, E experts, K top_k, A assignments (T*K), R rows (token choice: A,
# the kept ones first, grouped by expert)

Every plan has the same contract: `dispatch(x_TD) -> x_RD` with rows grouped by expert
(counts_E rows for expert 0, then expert 1, ...; rows past sum(counts_E) are padding), and
`combine(y_RD) -> y_TD`. Shapes never depend on the routing (R = T*K for token choice), so
no step reads a count on the host and torch.compile traces one graph.
An expert-parallel dispatcher replaces these with all-to-all versions (parallel/).

Token choice is a permutation of the T*K assignment slots (argsort by expert), so its
backward is the inverse permutation plus a sum over K: gathers only, no index_add scatter
(which runs serially on CPU). Dropped assignments are sorted behind the kept rows and
never computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .capacity import apply_capacity
from .config import MoEConfig
from .losses import expert_counts
from .routing.base import ExpertChoice, SoftAssignment, TokenChoice


class _PermuteTokens(torch.autograd.Function):
    """x_RD = x_TD[token_of_row_R]; backward gathers each token's K rows and sums them."""

    @staticmethod
    def forward(ctx, x_TD, plan):
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_of_row_R)

    @staticmethod
    def backward(ctx, grad_RD):
        plan = ctx.plan
        grad_TKD = plan.rows_to_slots(grad_RD).view(-1, plan.top_k, grad_RD.shape[-1])
        return grad_TKD.sum(dim=1), None


class _UnpermuteAndMix(torch.autograd.Function):
    """y_TD = sum_k w_TK * y_RD[row_of_slot]; dropped slots contribute zero."""

    @staticmethod
    def forward(ctx, y_RD, weights_TK, plan):
        T, K = weights_TK.shape
        y_TKD = plan.rows_to_slots(y_RD).view(T, K, y_RD.shape[-1])
        w_T1K = weights_TK.to(y_RD.dtype).unsqueeze(1)
        ctx.save_for_backward(y_TKD, w_T1K)
        ctx.plan, ctx.weights_dtype = plan, weights_TK.dtype
        return torch.bmm(w_T1K, y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD):
        y_TKD, w_T1K = ctx.saved_tensors
        plan = ctx.plan
        grad_TD = grad_TD.contiguous()
        # A dot product per slot: vecdot streams y once (a (1, D) @ (D, 1) bmm per slot
        # runs 2-7x slower on the CPU, worst in bf16).
        grad_w_TK = torch.linalg.vecdot(y_TKD, grad_TD.unsqueeze(1))
        # d y_RD[r] = w[slot r] * grad_TD[token r]: a gather and a row scale, no slot buffer.
        w_R1 = w_T1K.flatten().index_select(0, plan.slot_of_row_R).unsqueeze(-1)
        grad_y_RD = grad_TD.index_select(0, plan.token_of_row_R).mul_(w_R1)
        return grad_y_RD, grad_w_TK.to(ctx.weights_dtype), None


class TokenChoicePlan:
    """Permutation dispatch for token-choice routing, with static shapes.

    Every one of the A = T*K slots gets a row (R = A), so no size depends on the routing:
    kept slots are sorted by expert into the first sum(counts_E) rows, dropped or unused
    slots behind them (padding the experts never compute, read back as zeros).

    Args:
        ids_TK: expert per assignment; kept_TK: bool, False for dropped or unused slots
        (None: all kept); weights_TK: combine weights (0 where not kept).
    """

    def __init__(
        self, ids_TK: Tensor, kept_TK: Tensor | None, weights_TK: Tensor, num_experts: int
    ):
        T, K = ids_TK.shape
        self.top_k = K
        self.weights_TK = weights_TK
        self.kept_A = None if kept_TK is None else kept_TK.flatten()
        expert_A = (
            ids_TK.flatten()
            if kept_TK is None
            else torch.where(self.kept_A, ids_TK.flatten(), num_experts)
        )
        # Stable sort: within an expert, rows keep token order (deterministic, cache friendly).
        slot_order_A = torch.argsort(expert_A, stable=True)
        self.counts_E = expert_counts(expert_A, num_experts + 1)[:num_experts]
        self.slot_of_row_R = slot_order_A
        self.token_of_row_R = slot_order_A // K
        # Inverse permutation: the row that holds each slot.
        self.row_of_slot_A = torch.empty_like(slot_order_A).scatter_(
            0, slot_order_A, torch.arange(T * K, device=ids_TK.device)
        )

    def rows_to_slots(self, rows_RD: Tensor) -> Tensor:
        """rows_RD gathered into slot order (T*K, D); dropped slots get zeros."""
        slots_AD = rows_RD.index_select(0, self.row_of_slot_A)
        if self.kept_A is not None:  # padding rows hold garbage (even NaN): select, not scale
            slots_AD = torch.where(self.kept_A.unsqueeze(-1), slots_AD, 0)
        return slots_AD

    @classmethod
    def from_routing(
        cls, routing: TokenChoice, config: MoEConfig, capacity: int | None
    ) -> TokenChoicePlan:
        """Capacity (when set) decides which assignments are kept, then the permutation."""
        ids_TK, weights_TK, kept_TK = routing.ids_TK, routing.weights_TK, routing.valid_TK
        if capacity is not None:
            ids_TK, weights_TK, kept_TK = apply_capacity(
                routing, capacity, config.overflow, config.batch_priority
            )
        return cls(ids_TK, kept_TK, weights_TK, config.num_experts)

    def dispatch(self, x: Tensor) -> Tensor:
        return _PermuteTokens.apply(x.reshape(-1, x.shape[-1]), self)

    def combine(self, y_RD: Tensor) -> Tensor:
        return _UnpermuteAndMix.apply(y_RD, self.weights_TK, self)


class ExpertChoicePlan:
    """Expert choice: expert e processes tokens token_ids_EC[e]; a token may get 0..E rows."""

    def __init__(self, routing: ExpertChoice, num_tokens: int):
        E, C = routing.token_ids_EC.shape
        self.num_tokens = num_tokens
        self.token_of_row_R = routing.token_ids_EC.flatten()
        self.weights_R = routing.weights_EC.flatten()
        self.counts_E = torch.full((E,), C, dtype=torch.long, device=self.token_of_row_R.device)

    @classmethod
    def from_routing(
        cls, routing: ExpertChoice, config: MoEConfig, capacity: int | None
    ) -> ExpertChoicePlan:
        return cls(routing, routing.probs_TE.shape[0])

    def dispatch(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.token_of_row_R)

    def combine(self, y_RD: Tensor) -> Tensor:
        weighted_RD = y_RD * self.weights_R.to(y_RD.dtype).unsqueeze(-1)
        out_TD = y_RD.new_zeros(self.num_tokens, y_RD.shape[-1])
        return out_TD.index_add(0, self.token_of_row_R, weighted_RD)


class SoftPlan:
    """Soft MoE: slots are mixes of a sequence's tokens; rows ordered (expert, sequence, slot)."""

    def __init__(self, routing: SoftAssignment, num_experts: int):
        B, N, S = routing.dispatch_BNS.shape
        self.routing = routing
        self.num_experts = num_experts
        self.slots_per_expert = S // num_experts
        self.counts_E = torch.full(
            (num_experts,),
            B * self.slots_per_expert,
            dtype=torch.long,
            device=routing.dispatch_BNS.device,
        )

    @classmethod
    def from_routing(
        cls, routing: SoftAssignment, config: MoEConfig, capacity: int | None
    ) -> SoftPlan:
        return cls(routing, config.num_experts)

    def dispatch(self, x: Tensor) -> Tensor:
        x_BND = x.reshape(self.routing.dispatch_BNS.shape[:2] + x.shape[-1:])
        dispatch_BNS = self.routing.dispatch_BNS.to(x_BND.dtype)
        slots_BSD = torch.einsum("bns,bnd->bsd", dispatch_BNS, x_BND)
        B, _, D = slots_BSD.shape
        slots_EBsD = slots_BSD.view(B, self.num_experts, self.slots_per_expert, D).transpose(0, 1)
        return slots_EBsD.reshape(-1, D)

    def combine(self, y_RD: Tensor) -> Tensor:
        combine_BNS = self.routing.combine_BNS.to(y_RD.dtype)
        B = combine_BNS.shape[0]
        D = y_RD.shape[-1]
        y_BSD = y_RD.view(self.num_experts, B, self.slots_per_expert, D).transpose(0, 1)
        return torch.einsum("bns,bsd->bnd", combine_BNS, y_BSD.reshape(B, combine_BNS.shape[-1], D))


# Each routing decision's plan: the one place a decision family meets its dispatch.
PLANS = {TokenChoice: TokenChoicePlan, ExpertChoice: ExpertChoicePlan, SoftAssignment: SoftPlan}


def build_plan(routing, config: MoEConfig, capacity: int | None):
    """The dispatch plan for a routing decision (capacity applies to token choice)."""
    return PLANS[type(routing)].from_routing(routing, config, capacity)
