"""Softmax-scored token-choice routers: top-k, Switch top-1, dynamic top-p, dense.

# T tokens, D model, E experts, K top_k
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Router, TokenChoice
from .groups import group_limited, group_max


class SoftmaxTopK(Router):
    """GShard / Mixtral / DeepSeek-V2: softmax over experts, top-k (optionally group-limited).

    The top-k probabilities are the weights, renormalised to sum to 1 when renormalize.
    DeepSeek-V2's options (arXiv:2405.04434 section 2.2.2, transformers' topk_method
    "group_limited_greedy"): with num_groups > 1 a token picks its top_k experts inside
    the topk_groups groups holding its best probabilities (group score = the group's
    best probability; routing/groups.py); the weights are then times routed_scaling.

    With config.selection_bias (ERNIE 4.5's e_score_correction_bias), a float32 `bias`
    buffer (E,) is added to the probabilities to choose the experts, never to the
    weights (they stay the unbiased probabilities, renormalised when renormalize). It is
    a buffer, saved with the model and not trained by gradient; nothing here updates it.
    """

    optional_selection_bias: ClassVar[bool] = True
    group_limited: ClassVar[bool] = True

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.selection_bias:
            self.register_buffer("bias", torch.zeros(config.num_experts), persistent=True)

    @classmethod
    def weights_not_summing_to_one(cls, config) -> str | None:
        reason = super().weights_not_summing_to_one(config)
        if reason is None and config.routed_scaling != 1.0:
            reason = f"routed_scaling ({config.routed_scaling}) scales every token's output"
        return reason

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        cfg = self.config
        select_TE = probs_TE.detach() + self.bias if cfg.selection_bias else probs_TE
        rank_TE = group_limited(select_TE, cfg.num_groups, cfg.topk_groups, group_max)
        ids_TK = rank_TE.topk(self.top_k, dim=-1).indices
        weights_TK = self.renormalize(probs_TE.gather(1, ids_TK))
        gate_TE = probs_TE
        if cfg.routed_scaling != 1.0:
            weights_TK, gate_TE = weights_TK * cfg.routed_scaling, probs_TE * cfg.routed_scaling
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=gate_TE,
            rank_TE=rank_TE,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )

    def replay_weights(self, decision, ids_TK: Tensor, valid_TK: Tensor | None) -> Tensor:
        weights_TK = super().replay_weights(decision, ids_TK, valid_TK)
        if self.config.routed_scaling != 1.0:
            weights_TK = weights_TK * self.config.routed_scaling
        return weights_TK


class Switch(Router):
    """Switch Transformer (Fedus et al. 2021): top-1 with multiplicative input jitter.

    The weight is the raw top-1 probability (no renormalisation: that would make it 1
    and leave the router without a gradient from the task loss).
    """

    renormalizes: ClassVar[bool] = False
    splits_exactly: ClassVar[bool] = False

    @classmethod
    def check(cls, config) -> None:
        if config.top_k != 1:
            raise ValueError(f"the switch router is top-1; got top_k ({config.top_k})")
        super().check(config)

    @classmethod
    def weights_not_summing_to_one(cls, config) -> str | None:
        return "the switch router scales each token by its top-1 probability (below one)"

    def forward(self, x_TD: Tensor) -> TokenChoice:
        eps = self.config.jitter_eps
        if self.training and eps > 0:
            noise_TD = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            x_TD = x_TD * noise_TD
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, ids_TK = probs_TE.max(dim=-1, keepdim=True)
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=probs_TE,
            rank_TE=probs_TE,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )


class GShardTop2(Router):
    """GShard (Lepikhin et al. 2020, Algorithm 1): top-2 whose second expert is random.

    The top-2 softmax weights are normalised to g1 + g2 = 1. In training the second
    expert is then dispatched only with probability 2 * g2 (<= 1, since g2 <= g1): a token
    whose second choice barely matters rarely spends an expert's capacity on it. The first
    expert keeps its weight g1 either way (no renormalisation after the draw, as in the
    paper), and a skipped second slot is an unused slot (valid_TK False, weight 0). In
    evaluation both experts are used, deterministically. The draw uses torch's global
    generator, so torch.manual_seed makes it reproducible.
    """

    splits_exactly: ClassVar[bool] = False

    @classmethod
    def check(cls, config) -> None:
        if config.top_k != 2:
            raise ValueError(f"the gshard router is top-2; got top_k ({config.top_k})")
        super().check(config)

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, ids_TK = probs_TE.topk(2, dim=-1)
        weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        valid_TK = None
        if self.training:
            keep_second_T = 2 * weights_TK[:, 1].detach() > torch.rand_like(weights_TK[:, 1])
            valid_TK = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=-1)
            weights_TK = weights_TK * valid_TK
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=valid_TK,
            gate_TE=probs_TE,
            rank_TE=probs_TE,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )

    @classmethod
    def weights_not_summing_to_one(cls, config) -> str | None:
        return "the gshard router drops a token's second expert at random in training"

    def replay_weights(self, decision, ids_TK: Tensor, valid_TK: Tensor | None) -> Tensor:
        """g1 + g2 = 1 over both experts, then an unused second slot weighs 0 (as forward)."""
        top_TK = decision.probs_TE.gather(1, ids_TK)
        weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return weights_TK if valid_TK is None else weights_TK * valid_TK


class TopP(Router):
    """Dynamic routing (Huang et al. 2024): the fewest experts whose probabilities reach p.

    Each token takes experts in order of probability until their sum is >= top_p, at most
    top_k of them. Unused slots have valid_TK False and weight 0.
    """

    splits_exactly: ClassVar[bool] = False

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        # Slot k is used if the mass of the better slots is still below p.
        mass_before_TK = weights_TK.cumsum(dim=-1) - weights_TK
        valid_TK = mass_before_TK < self.config.top_p
        weights_TK = self.renormalize(weights_TK * valid_TK)
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=valid_TK,
            gate_TE=probs_TE,
            rank_TE=probs_TE,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )


class Dense(Router):
    """The classic mixture (Jacobs et al. 1991): every expert runs, mixed by the softmax."""

    uses_capacity: ClassVar[bool] = False
    sparse: ClassVar[bool] = False
    renormalizes: ClassVar[bool] = False  # the full softmax already sums to one
    balances: ClassVar[bool] = False  # every expert runs for every token

    @classmethod
    def fixed_top_k(cls, config) -> int:
        """Every expert: top_k is fixed by the definition."""
        return config.num_experts

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        ids_TK = torch.arange(self.num_experts, device=x_TD.device).expand_as(probs_TE)
        return TokenChoice(
            weights_TK=probs_TE,
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=probs_TE,
            rank_TE=probs_TE,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )
