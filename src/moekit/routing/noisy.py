"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

# T tokens, D model, E experts, K top_k
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .base import Router, TokenChoice


class NoisyTopK(Router):
    """Noisy top-k (Shazeer et al. 2017): KeepTopK of noisy logits, softmax over the kept.

    H = x W_g + N(0, 1) * softplus(x W_noise).

    Noise is added in training only. In training the router also returns the smooth load
    estimate of the paper's appendix A (eq. 8-10), which the load loss needs.
    """

    smooth_load: ClassVar[bool] = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        # Zero init as in the paper: all experts start with equal, unit-free noise.
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model))

    def reset_parameters(self, std: float | None = None) -> None:
        super().reset_parameters(std)
        if hasattr(self, "noise_weight"):  # not yet created during Router.__init__
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: Tensor) -> TokenChoice:
        clean_TE = self.logits(x_TD)
        load_E = load_TE = None
        if self.training:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float()))
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            load_TE = self._smooth_load(clean_TE, noisy_TE, noise_std_TE)
            load_E = load_TE.sum(dim=0)
        else:
            noisy_TE = clean_TE
        probs_TE = noisy_TE.softmax(dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        return TokenChoice(
            weights_TK=self.renormalize(weights_TK),
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=probs_TE,
            rank_TE=probs_TE,
            logits_TE=clean_TE,
            probs_TE=probs_TE,
            load_E=load_E,
            load_TE=load_TE,
        )

    def _smooth_load(self, clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor) -> Tensor:
        """Eq. (9)-(10): per token, P(expert i still in the top-k if re-noised); the load
        estimate is its sum over the tokens."""
        k = self.top_k
        if k == self.num_experts:
            return torch.ones_like(clean_TE)
        top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
        # kth_excluding(H, k, i): the k-th best of the *other* experts. For an expert in the
        # top-k that is the (k+1)-th best overall, for one outside it the k-th best.
        in_top_TE = noisy_TE >= top_TK1[:, k - 1 : k]
        threshold_TE = torch.where(in_top_TE, top_TK1[:, k : k + 1], top_TK1[:, k - 1 : k])
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_TE = normal.cdf((clean_TE - threshold_TE) / noise_std_TE.clamp_min(1e-9))
        return prob_TE
