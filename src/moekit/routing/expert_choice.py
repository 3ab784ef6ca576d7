"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

# T tokens, D model, E experts, C capacity per expert
Not causal: whether a token is picked depends on the other tokens of the batch, so use it
in encoders, or in decoders only with care (the paper's decoder results need a fix).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..config import MoEConfig, warn_once
from .base import ExpertChoice, Router


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert keeps the C tokens it scores best.

    Scores are a softmax over experts per token.

    C = ceil(capacity_factor * T * top_k / E) (capacity_factor None means 1), so on average
    a token is processed by top_k experts; some tokens get more, some none.
    """

    causal: ClassVar[bool] = False
    renormalizes: ClassVar[bool] = False
    splits_exactly: ClassVar[bool] = False
    balances: ClassVar[bool] = False  # every expert takes exactly C tokens

    @classmethod
    def capacity_factor(cls, config: MoEConfig) -> float:
        """capacity_factor, 1 when None: every expert takes C tokens."""
        return 1.0 if config.capacity_factor is None else config.capacity_factor

    @classmethod
    def warn_settings_without_effect(cls, config: MoEConfig) -> None:
        super().warn_settings_without_effect(config)
        if config.overflow != "drop" or config.batch_priority:
            warn_once("overflow and batch_priority have no effect with expert_choice routing")

    @classmethod
    def active_fraction(cls, config: MoEConfig) -> float:
        """Each expert takes C = cf * T * top_k / E tokens, so a token is processed by
        cf * top_k experts on average (cf None means 1)."""
        return min(1.0, cls.capacity_factor(config) * config.top_k / config.num_experts)

    @classmethod
    def weights_not_summing_to_one(cls, config: MoEConfig) -> str | None:
        return "expert_choice routing does not give every token weights that sum to one"

    def route(self, x: Tensor, capacity: int | None) -> ExpertChoice:
        return self(x.reshape(-1, x.shape[-1]), capacity)

    def forward(self, x_TD: Tensor, capacity: int) -> ExpertChoice:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_EC, token_ids_EC = probs_TE.t().topk(capacity, dim=-1)
        return ExpertChoice(
            weights_EC=weights_EC,
            token_ids_EC=token_ids_EC,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
        )
