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
from torch import Tensor

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
    counts = torch.bincount(expert_A, minlength=num_bins)
    starts = counts.cumsum(0) - counts
    position_sorted_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts[
        expert_A[sorted_A]
    ]
    return torch.empty_like(position_sorted_A).scatter_(0, sorted_A, position_sorted_A)


def apply_capacity(
    routing: TokenChoice, capacity: int, overflow: str, batch_priority: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Limit every expert to `capacity` assignments.

    Returns:
        ids_TK: experts after rerouting (unchanged for drop), weights_TK (0 where not kept),
        kept_TK: bool mask of the assignments that are processed.
    """
    ids_TK, weights_TK = routing.ids_TK, routing.weights_TK
    T, K = ids_TK.shape
    E = routing.gate_TE.shape[-1]
    valid_TK = routing.valid_TK if routing.valid_TK is not None else torch.ones_like(ids_TK, dtype=torch.bool)
    priority_T = routing.gate_TE.detach().max(dim=-1).values if batch_priority else None

    # 1. first pass: every valid assignment claims a slot at its chosen expert.
    order_A = claim_order(T, K, priority_T, device=ids_TK.device)
    expert_A = torch.where(valid_TK, ids_TK, E).flatten()[order_A]
    kept_A = (positions_in_expert(expert_A, E + 1) < capacity) & (expert_A < E)
    kept_TK = torch.empty_like(kept_A).scatter_(0, order_A, kept_A).view(T, K)

    # 2. reroute what overflowed, or drop it.
    if overflow == "reroute":
        overflowed_A = ~kept_A & (expert_A < E)
        if bool(overflowed_A.any()):
            ids_TK, weights_TK, kept_TK = _reroute(
                routing, ids_TK, weights_TK, kept_TK, valid_TK, order_A[overflowed_A], capacity
            )
    return ids_TK, weights_TK * kept_TK, kept_TK


def _reroute(
    routing: TokenChoice,
    ids_TK: Tensor,
    weights_TK: Tensor,
    kept_TK: Tensor,
    valid_TK: Tensor,
    pending_slots: Tensor,
    capacity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Move overflowed assignments (flat slots, in claim order) down each token's ranking."""
    T, K = ids_TK.shape
    E = routing.gate_TE.shape[-1]
    ids_TK, kept_TK = ids_TK.clone(), kept_TK.clone()
    new_weight_TK = weights_TK.clone()
    rank_TE = routing.rank_TE.detach()
    order_TE = torch.argsort(rank_TE, dim=-1, descending=True, stable=True)
    used_TE = torch.zeros(T, E, dtype=torch.bool, device=ids_TK.device)
    used_TE.scatter_(1, ids_TK, valid_TK)  # a token never takes the same expert twice
    room_E = capacity - torch.bincount(ids_TK[kept_TK], minlength=E)
    next_rank_T = valid_TK.sum(dim=-1)  # the token's own picks hold the first ranks
    gate_TE = routing.gate_TE

    while pending_slots.numel():
        tokens = pending_slots // K
        # This round: each token's earliest pending slot tries its next-ranked expert.
        first = _first_occurrence(tokens)
        slots, tokens = pending_slots[first], tokens[first]
        exhausted = next_rank_T[tokens] >= E
        candidate = order_TE[tokens, next_rank_T[tokens].clamp(max=E - 1)]
        allowed = torch.isfinite(rank_TE[tokens, candidate]) & ~exhausted
        next_rank_T[tokens] += 1
        tries = allowed & ~used_TE[tokens, candidate]
        position = positions_in_expert(torch.where(tries, candidate, E), E + 1)
        wins = tries & (position < room_E.index_select(0, candidate.clamp(max=E - 1)))
        # Winners move; losers stay pending unless they ran out of experts.
        won_slots, won_tokens, won_expert = slots[wins], tokens[wins], candidate[wins]
        k = won_slots % K
        old_expert = ids_TK[won_tokens, k]
        scale = weights_TK[won_tokens, k] / gate_TE[won_tokens, old_expert].clamp_min(1e-20)
        new_weight_TK = new_weight_TK.index_put(
            (won_tokens, k), gate_TE[won_tokens, won_expert] * scale
        )
        ids_TK[won_tokens, k] = won_expert
        kept_TK[won_tokens, k] = True
        used_TE[won_tokens, won_expert] = True
        room_E -= torch.bincount(won_expert, minlength=E)
        finished = torch.zeros_like(pending_slots, dtype=torch.bool)
        finished[first] = wins | ~allowed
        pending_slots = pending_slots[~finished]
    return ids_TK, new_weight_TK, kept_TK


def _first_occurrence(values: Tensor) -> Tensor:
    """Bool mask: True where values[i] does not occur in values[:i]."""
    positions = torch.arange(values.numel(), device=values.device)
    first_pos = torch.full(
        (int(values.max()) + 1,), values.numel(), dtype=torch.long, device=values.device
    )
    first_pos.scatter_reduce_(0, values, positions, reduce="amin")
    return first_pos[values] == positions
