"""DeepSeek-V3 routing: sigmoid scores, group-limited top-k, aux-loss-free bias balancing.

# T tokens, D model, E experts, K top_k, G groups
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..config import MoEConfig
from ..losses import expert_counts
from .base import Router, TokenChoice
from .groups import group_limited, group_top2_sum


class SigmoidTopK(Router):
    """DeepSeek-V3: sigmoid scores, group-limited top-k, bias used for selection only.

    DeepSeek-V3 section 2.1.2: experts are split into num_groups groups, each group is
    scored by the sum of its two best biased scores, each token keeps its topk_groups best
    groups and picks its top_k experts inside them. Weights are the unbiased scores of
    the chosen experts, normalised to sum to 1 (when renormalize) and times routed_scaling.

    Balancing (section 2.1.2, "auxiliary-loss-free"): after each optimizer step call
    `update_bias()`; it moves each expert's bias by rate * sign(mean_load - load) using
    the loads counted since the previous call, outside autograd.
    """

    has_selection_bias: ClassVar[bool] = True
    group_limited: ClassVar[bool] = True

    @classmethod
    def weights_not_summing_to_one(cls, config: MoEConfig) -> str | None:
        reason = super().weights_not_summing_to_one(config)
        if reason is None and config.routed_scaling != 1.0:
            reason = f"routed_scaling ({config.routed_scaling}) scales every token's output"
        return reason

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.register_buffer("bias", torch.zeros(config.num_experts), persistent=True)
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        rank_TE = group_limited(
            scores_TE.detach() + self.bias,
            self.config.num_groups,
            self.config.topk_groups,
            group_top2_sum,
        )
        ids_TK = rank_TE.topk(self.top_k, dim=-1).indices
        weights_TK = self.renormalize(scores_TE.gather(1, ids_TK)) * self.config.routed_scaling
        if self.training:
            with torch.no_grad():
                self.load_since_update += expert_counts(ids_TK, self.num_experts).to(
                    self.load_since_update.dtype
                )
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=scores_TE * self.config.routed_scaling,
            rank_TE=rank_TE,
            logits_TE=logits_TE,
            # Balancing losses use the normalised affinities (DeepSeek-V3 eq. 19).
            probs_TE=scores_TE / scores_TE.sum(dim=-1, keepdim=True),
        )

    def replay_weights(self, decision, ids_TK: Tensor, valid_TK: Tensor | None) -> Tensor:
        """The unbiased sigmoid scores of ids_TK, renormalised, times routed_scaling."""
        scores_TE = decision.logits_TE.sigmoid()
        weights_TK = scores_TE.gather(1, ids_TK)
        if valid_TK is not None:
            weights_TK = weights_TK * valid_TK
        return self.renormalize(weights_TK) * self.config.routed_scaling

    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """Aux-loss-free update: bias += rate * sign(mean_load - load).

        Args:
            load_E: tokens routed to each expert (E,). Defaults to the counts gathered in
                training forwards since the last call (then reset). Pass an all-reduced
                count under data or expert parallelism.
        """
        if load_E is None:
            load_E = self.load_since_update.clone()
            self.load_since_update.zero_()
        load_E = load_E.to(self.bias.dtype)
        self.bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
