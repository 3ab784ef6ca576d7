"""Expert capacity for token-choice routing: which assignments fit, and what overflows.

# T tokens, E experts, K top_k, A assignments (T * K slots, flattened token-major: t * K + k)

Claim order (GShard, Switch): every token's first choice claims a slot before any token's
second choice; within one choice rank, earlier tokens first — or, with batch priority
routing (V-MoE, Riquelme et al. 2021), tokens with the highest router score first.
An expert keeps its first C claims.

Overflow policies for the claims past C:
- drop: the assignment is skipped; the token keeps its other experts (with a residual
  connection around the layer, a token with none passes through unchanged).
- reroute: the assignment moves to the token's next-ranked expert (by the router's ranking,
  skipping experts the token already uses) that still has room. Rerouting runs in rounds:
  in each round every token with an overflowed assignment tries one more expert down its
  ranking with its earliest pending assignment; the candidates claim the remaining room in
  claim order. An assignment that runs out of experts is dropped. A rerouted assignment
  keeps the token's normalisation: its weight is the new expert's gate value times
  (original weight / original expert's gate value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import expert_counts
from .routing.base import TokenChoice


def claim_order(
    num_tokens: int, top_k: int, priority_T: Tensor | None, device: torch.device | None = None
) -> Tensor:
    """Flat slot indices (A,) in the order they claim capacity.

    Args:
        priority_T: per-token score (higher claims first), or None for position order.
        device: where the indices live (the routing's device; scatter needs them there).
    """
    if priority_T is None:
        token_order_T = torch.arange(num_tokens, device=device)
    else:
        token_order_T = torch.argsort(priority_T, descending=True, stable=True)
    ranks_K1 = torch.arange(top_k, device=token_order_T.device).unsqueeze(1)
    return (token_order_T.unsqueeze(0) * top_k + ranks_K1).flatten()


def positions_in_expert(expert_A: Tensor, num_bins: int) -> Tensor:
    """For each entry, how many earlier entries name the same expert (its slot index).

    Args:
        expert_A: expert id per entry (long, < num_bins), in claim order.
    Returns:
        (A,) long position of each entry within its expert.
    """
    sorted_A = torch.argsort(expert_A, stable=True)
    counts = expert_counts(expert_A, num_bins)
    starts = counts.cumsum(0) - counts
    position_sorted_A = (
        torch.arange(expert_A.numel(), device=expert_A.device) - starts[expert_A[sorted_A]]
    )
    return torch.empty_like(position_sorted_A).scatter_(0, sorted_A, position_sorted_A)


def apply_capacity(
    routing: TokenChoice, capacity: int, overflow: str, batch_priority: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Limit every expert to `capacity` assignments.

    Every tensor keeps its (T, K) shape whatever the routing: nothing here reads a value
    on the host (torch.compile traces it whole).

    Returns:
        ids_TK: experts after rerouting (unchanged for drop), weights_TK (0 where not kept),
        kept_TK: bool mask of the assignments that are processed.
    """
    ids_TK, weights_TK = routing.ids_TK, routing.weights_TK
    T, K = ids_TK.shape
    E = routing.gate_TE.shape[-1]
    valid_TK = (
        routing.valid_TK
        if routing.valid_TK is not None
        else torch.ones_like(ids_TK, dtype=torch.bool)
    )
    priority_T = routing.gate_TE.detach().max(dim=-1).values if batch_priority else None

    # 1. first pass: every valid assignment claims a slot at its chosen expert.
    order_A = claim_order(T, K, priority_T, device=ids_TK.device)
    expert_A = torch.where(valid_TK, ids_TK, E).flatten()[order_A]
    kept_A = (positions_in_expert(expert_A, E + 1) < capacity) & (expert_A < E)
    kept_TK = torch.empty_like(kept_A).scatter_(0, order_A, kept_A).view(T, K)

    # 2. reroute what overflowed, or drop it.
    if overflow == "reroute":
        ids_TK, weights_TK, kept_TK = _reroute(routing, valid_TK, kept_TK, order_A, capacity)
    return ids_TK, weights_TK * kept_TK, kept_TK


def _reroute(
    routing: TokenChoice, valid_TK: Tensor, kept_TK: Tensor, order_A: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Move overflowed assignments down each token's ranking, in rounds (module docstring).

    Static shapes: each round works on all T tokens with masks. A round advances every
    token that still has a pending assignment one rank, so after E + K rounds nothing is
    pending; eager CPU runs stop as soon as nothing is (reading that flag is free there),
    compiled and GPU runs do the fixed rounds without a host sync.
    """
    ids_TK, weights_TK, gate_TE = routing.ids_TK, routing.weights_TK, routing.gate_TE
    T, K = ids_TK.shape
    E = gate_TE.shape[-1]
    device = ids_TK.device
    rank_TE = routing.rank_TE.detach()
    order_TE = torch.argsort(rank_TE, dim=-1, descending=True, stable=True)
    used_TE = torch.zeros(T, E, dtype=torch.bool, device=device)
    used_TE.scatter_(1, ids_TK, valid_TK)  # a token never takes the same expert twice
    room_E = capacity - expert_counts(ids_TK, E + 1, kept_TK)[:E]
    next_rank_T = valid_TK.sum(dim=-1)  # the token's own picks hold the first ranks
    # Claim position of each slot: a token's pending slots compete in this order.
    claim_pos_TK = (
        torch.empty_like(order_A)
        .scatter_(0, order_A, torch.arange(T * K, device=device))
        .view(T, K)
    )
    pending_TK = valid_TK & ~kept_TK
    new_ids_TK, new_weights_TK, kept_TK = ids_TK.clone(), weights_TK, kept_TK.clone()
    tokens_T = torch.arange(T, device=device)
    k_range_K = torch.arange(K, device=device)
    stop_early = device.type == "cpu" and not torch.compiler.is_compiling()
    # A winner's new weight is the new gate times (original weight / original gate).
    scale_TK = weights_TK / gate_TE.gather(1, ids_TK).clamp_min(1e-20)

    for _ in range(E + K):
        if stop_early and not bool(pending_TK.any()):
            break
        # This round: each token's earliest pending slot tries its next-ranked expert.
        has_pending_T = pending_TK.any(dim=-1)
        k_T = torch.where(pending_TK, claim_pos_TK, T * K).argmin(dim=-1)
        exhausted_T = next_rank_T >= E
        candidate_T = order_TE.gather(1, next_rank_T.clamp(max=E - 1).unsqueeze(1)).squeeze(1)
        allowed_T = has_pending_T & ~exhausted_T & torch.isfinite(rank_TE[tokens_T, candidate_T])
        next_rank_T = next_rank_T + has_pending_T.long()
        tries_T = allowed_T & ~used_TE[tokens_T, candidate_T]
        # The trying tokens claim the remaining room in their slots' claim order.
        claim_T = torch.where(tries_T, claim_pos_TK[tokens_T, k_T], T * K)
        by_claim_T = torch.argsort(claim_T, stable=True)
        expert_in_order_T = torch.where(tries_T, candidate_T, E)[by_claim_T]
        position_T = torch.empty_like(by_claim_T).scatter_(
            0, by_claim_T, positions_in_expert(expert_in_order_T, E + 1)
        )
        wins_T = tries_T & (position_T < room_E[candidate_T.clamp(max=E - 1)])
        # Winners move.
        win_TK = wins_T.unsqueeze(1) & (k_range_K == k_T.unsqueeze(1))
        new_gate_T1 = gate_TE.gather(1, candidate_T.unsqueeze(1))
        new_weights_TK = torch.where(win_TK, new_gate_T1 * scale_TK, new_weights_TK)
        new_ids_TK = torch.where(win_TK, candidate_T.unsqueeze(1), new_ids_TK)
        kept_TK = kept_TK | win_TK
        used_TE = used_TE | (F.one_hot(candidate_T, E).bool() & wins_T.unsqueeze(1))
        room_E = room_E - expert_counts(candidate_T, E, wins_T)
        # Losers stay pending unless they ran out of experts.
        finished_T = has_pending_T & (wins_T | ~allowed_T)
        pending_TK = pending_TK & ~(finished_T.unsqueeze(1) & (k_range_K == k_T.unsqueeze(1)))
    return new_ids_TK, new_weights_TK, kept_TK
