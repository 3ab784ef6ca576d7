"""Routing decisions that span the expert-parallel group: capacity and expert choice.

# T tokens (this rank), G tokens (the whole EP group), E experts, K top_k

Under expert parallelism the tokens of one EP group meet at the same experts, so the
group's tokens are treated as one batch, in EP-rank order (rank 0's tokens first):
- capacity C = ceil(cf * G * top_k / E) from the group's token count G, the same number on
  every rank; the claim order (choice rank, then position or batch priority) runs over
  all G tokens. Each rank gets exactly the kept/dropped/rerouted decisions the single
  process would make for the concatenated batch.
- expert choice: each expert picks its top-C of all G tokens.
- token choice without capacity, dense and Soft MoE need nothing global (Soft MoE mixes
  the tokens of one sequence, and a sequence never spans ranks).
Only the small routing tensors travel (ids, validity, and the (T, E) gates when priority
or rerouting needs them), never hidden states. Data-parallel replicas plan separately.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from ..capacity import apply_capacity
from ..dispatch import TokenChoicePlan
from ..routing.base import TokenChoice


def gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Every rank's `t` (sizes[r] rows each), concatenated in rank order; no autograd."""
    padded = t.new_zeros(max(sizes), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class GroupPlanner:
    """MoE.planner for expert parallelism: route locally, decide capacity group-wide.

    Args:
        ep_group: the expert-parallel process group.
    """

    def __init__(self, ep_group):
        self.group = ep_group
        self.rank = dist.get_rank(ep_group)

    def __call__(self, layer, x: Tensor):
        cfg = layer.config
        if not layer.router.uses_capacity:  # dense and Soft MoE: nothing is group-wide
            return layer.route_and_plan(x)
        x_TD = x.reshape(-1, cfg.d_model)
        sizes = self._sizes(x_TD.shape[0], x.device)
        capacity = cfg.capacity(sum(sizes))
        if capacity is None:  # dropless token choice: every rank plans alone
            return layer.route_and_plan(x)
        # Capacity 0: an expert-choice router's local pick is replaced group-wide below.
        routing = layer.route(x_TD, 0)
        group_plan = self._token_choice if isinstance(routing, TokenChoice) else self._expert_choice
        return x_TD, routing, group_plan(layer, x_TD, routing, sizes, capacity), capacity

    def _token_choice(self, layer, x_TD: Tensor, routing: TokenChoice, sizes, capacity: int):
        """Capacity decided over the group's tokens; this rank keeps its own rows of it."""
        cfg = layer.config
        start, T = sum(sizes[: self.rank]), x_TD.shape[0]
        group_routing = self._group_token_choice(routing, sizes, start, cfg)
        ids_GK, weights_GK, kept_GK = apply_capacity(
            group_routing, capacity, cfg.overflow, cfg.batch_priority
        )
        rows = slice(start, start + T)
        return TokenChoicePlan(ids_GK[rows], kept_GK[rows], weights_GK[rows], cfg.num_experts)

    def _sizes(self, num_tokens: int, device: torch.device) -> list[int]:
        counts = [
            torch.zeros(1, dtype=torch.long, device=device)
            for _ in range(dist.get_world_size(self.group))
        ]
        dist.all_gather(counts, torch.tensor([num_tokens], device=device), group=self.group)
        return [int(c) for c in counts]

    def _splice(self, local: Tensor, sizes: list[int], start: int) -> Tensor:
        """The group's rows with this rank's own rows live (autograd flows into them)."""
        group_rows = gather_rows(local.detach(), sizes, self.group)
        return torch.cat([group_rows[:start], local, group_rows[start + local.shape[0] :]])

    def _group_token_choice(self, routing: TokenChoice, sizes, start, cfg) -> TokenChoice:
        """The routing of all the group's tokens, as far as apply_capacity reads it."""
        G, E = sum(sizes), cfg.num_experts
        valid = routing.valid_TK
        needs_gates = cfg.batch_priority or cfg.overflow == "reroute"
        unused_GE = routing.gate_TE.new_zeros(1, E).expand(G, E)  # read for its width only
        return dataclasses.replace(
            routing,
            ids_TK=gather_rows(routing.ids_TK, sizes, self.group),
            weights_TK=self._splice(routing.weights_TK, sizes, start),
            valid_TK=None
            if valid is None
            else gather_rows(valid.to(torch.uint8), sizes, self.group).bool(),
            gate_TE=self._splice(routing.gate_TE, sizes, start) if needs_gates else unused_GE,
            rank_TE=self._splice(routing.rank_TE, sizes, start)
            if cfg.overflow == "reroute"
            else unused_GE,
        )

    def _expert_choice(self, layer, x_TD: Tensor, routing, sizes: list[int], capacity: int):
        """Each expert's top-C over the group's tokens, as a (T, E) token-choice plan."""
        E = layer.config.num_experts
        probs_GE = gather_rows(routing.probs_TE.detach(), sizes, self.group)
        token_ids_EC = probs_GE.t().topk(capacity, dim=-1).indices
        chosen_EG = torch.zeros(E, probs_GE.shape[0], dtype=torch.bool, device=x_TD.device)
        chosen_EG.scatter_(1, token_ids_EC, True)
        start, T = sum(sizes[: self.rank]), x_TD.shape[0]
        chosen_TE = chosen_EG[:, start : start + T].t()
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return TokenChoicePlan(ids_TE, chosen_TE, routing.probs_TE * chosen_TE, E)
