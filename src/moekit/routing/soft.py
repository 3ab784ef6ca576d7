"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

# B sequences, N tokens per sequence, D model, E experts, S slots (E * slots_per_expert)
Not causal: every slot is a mix of all tokens of the sequence, so a token's output depends
on the tokens after it. Use it in encoders (ViT), not in autoregressive decoders.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .base import RouterRules, SoftAssignment


class SoftRouter(RouterRules, nn.Module):
    """Soft MoE (Puigcerver et al. 2023): slots mix all tokens of a sequence; not causal.

    Slot parameters Phi (D, S); dispatch = softmax over tokens, combine = over slots.

    Inputs and Phi are L2-normalised with a learned scale, as the paper does (section 2.3)
    so that the logits stay in range when d_model is large.
    """

    causal: ClassVar[bool] = False
    uses_capacity: ClassVar[bool] = False
    sparse: ClassVar[bool] = False
    mixes_tokens: ClassVar[bool] = True
    has_selection_bias: ClassVar[bool] = False
    renormalizes: ClassVar[bool] = False
    splits_exactly: ClassVar[bool] = False
    balances: ClassVar[bool] = False  # every expert gets the same slots

    @classmethod
    def check(cls, config: MoEConfig) -> None:
        if config.router_bias:
            raise ValueError("router_bias is not supported by the soft router (it scores slots)")
        super().check(config)

    @classmethod
    def active_fraction(cls, config: MoEConfig) -> float:
        """Every expert: each token's output mixes every expert's slots (its FLOPs per
        token are lower: E * slots_per_expert slots per sequence)."""
        return 1.0

    @classmethod
    def weights_not_summing_to_one(cls, config: MoEConfig) -> str | None:
        return "soft routing does not give every token weights that sum to one"

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_slots = config.num_experts * config.slots_per_expert
        self.slot_weight = nn.Parameter(torch.empty(num_slots, config.d_model))
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Slot parameters ~ N(0, std) (default d_model**-0.5), the scale at 1."""
        std = self.config.d_model**-0.5 if std is None else std
        nn.init.normal_(self.slot_weight, std=std)
        nn.init.ones_(self.scale)

    def route(self, x: Tensor, capacity: int | None) -> SoftAssignment:
        """Soft MoE mixes the tokens of one sequence: x is (B, N, D), or one sequence (N, D)."""
        x_BND = x if x.dim() >= 3 else x.unsqueeze(0)
        return self(x_BND.reshape(-1, x_BND.shape[-2], x_BND.shape[-1]))

    def forward(self, x_BND: Tensor) -> SoftAssignment:
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            x_BND = F.normalize(x_BND.float(), dim=-1)
            phi_SD = self.scale * F.normalize(self.slot_weight.float(), dim=-1)
            logits_BNS = F.linear(x_BND, phi_SD)
        return SoftAssignment(
            dispatch_BNS=logits_BNS.softmax(dim=1),
            combine_BNS=logits_BNS.softmax(dim=2),
            logits_BNS=logits_BNS,
        )
