"""What routers return, and the shared gate every router starts from.

# T tokens, D model, E experts, K top_k, C capacity per expert, S slots per expert
Router math runs in fp32 whatever the input dtype (ST-MoE section 3: bf16 router logits
make the softmax unstable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig


@dataclass
class TokenChoice:
    """Each token picks up to K experts.

    weights_TK: combine weights (fp32, differentiable; 0 in unused slots).
    ids_TK: chosen experts (long), best first.
    valid_TK: bool mask of used slots, or None when every slot is used (top_p leaves some
        unused).
    gate_TE: the per-expert gate value the weights are taken from (softmax probability or
        sigmoid score), used to weight an assignment that capacity reroutes.
    rank_TE: the scores experts were ranked by (-inf for experts a token may not use);
        capacity rerouting walks this ranking.
    logits_TE: raw fp32 router logits (z-loss).
    probs_TE: per-token distribution over experts for the balancing losses and entropy.
    load_E: differentiable load estimate (noisy top-k only), else None.
    """

    weights_TK: Tensor
    ids_TK: Tensor
    valid_TK: Tensor | None
    gate_TE: Tensor
    rank_TE: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    load_E: Tensor | None = None


@dataclass
class ExpertChoice:
    """Each expert picks its top-C tokens (Zhou et al. 2022).

    token_ids_EC: the tokens each expert processes (long), weights_EC their combine weights.
    """

    weights_EC: Tensor
    token_ids_EC: Tensor
    logits_TE: Tensor
    probs_TE: Tensor


@dataclass
class SoftAssignment:
    """Soft MoE (Puigcerver et al. 2023) for tokens grouped into sequences.

    dispatch_BNS: per slot, a softmax over the N tokens of its sequence (dim 1).
    combine_BNS: per token, a softmax over all E*S slots (dim 2).
    Slot s belongs to expert s // slots_per_expert.
    """

    dispatch_BNS: Tensor
    combine_BNS: Tensor
    logits_BNS: Tensor


class Router(nn.Module):
    """Linear gate D -> E in fp32; subclasses turn logits into a routing decision.

    Class attributes say what a router is, so code outside routing/ never compares names:
        causal: a token's routing depends on that token alone (usable in a decoder).
        uses_capacity: capacity_factor limits the experts (token choice: when set).
        has_selection_bias: a `bias` buffer shifts selection only (DeepSeek-V3).
    """

    causal: ClassVar[bool] = True
    uses_capacity: ClassVar[bool] = True
    has_selection_bias: ClassVar[bool] = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Gate weights ~ N(0, std) (default d_model**-0.5); state buffers to zero."""
        std = self.config.d_model**-0.5 if std is None else std
        nn.init.normal_(self.weight, std=std)
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def logits(self, x_TD: Tensor) -> Tensor:
        """fp32 router logits (T, E), outside any autocast region."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())

    def renormalize(self, weights_TK: Tensor) -> Tensor:
        """Scale the chosen weights to sum to 1 per token when configured."""
        if not self.config.renormalize:
            return weights_TK
        return weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
