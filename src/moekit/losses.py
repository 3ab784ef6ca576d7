"""Router losses as pure functions of the routing decision; the layer weights and sums them.

# T tokens, E experts, K top_k
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(ids: Tensor, num_bins: int, valid: Tensor | None = None) -> Tensor:
    """(num_bins,) long count of each id (only where `valid`): a bincount of static shape.

    bincount's output size depends on the values, so torch.compile cannot trace it into
    one graph; a scatter_add into a fixed-size buffer can, and never syncs with the host.
    """
    ids = ids.flatten()
    ones = torch.ones_like(ids) if valid is None else valid.flatten().long()
    return torch.zeros(num_bins, dtype=torch.long, device=ids.device).scatter_add_(0, ids, ones)


def switch_balance_loss(probs_TE: Tensor, ids_TK: Tensor, valid_TK: Tensor | None = None) -> Tensor:
    """Switch Transformer eq. (4): N * sum_i f_i * P_i.

    f_i is the fraction of the (valid) assignments that chose expert i, counted before
    capacity (no gradient); P_i the mean router probability of expert i. 1.0 when
    perfectly balanced, N when every token goes to one expert.
    """
    E = probs_TE.shape[-1]
    counts_E = expert_counts(ids_TK, E, valid_TK).to(probs_TE.dtype)
    fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * torch.dot(fraction_E, probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE eq. (5): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation, var / mean^2 (0 for a single value)."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.float().var(correction=0) / (values.float().mean().square() + 1e-10)


def importance_loss(weights_TK: Tensor, ids_TK: Tensor, num_experts: int) -> Tensor:
    """Shazeer et al. 2017 eq. (6): CV^2 of importance, the per-expert sum of gate values."""
    importance_E = weights_TK.new_zeros(num_experts).index_add(
        0, ids_TK.flatten(), weights_TK.flatten()
    )
    return cv_squared(importance_E)


def load_loss(load_E: Tensor) -> Tensor:
    """Shazeer et al. 2017 eq. (11): CV^2 of the (smooth) per-expert load."""
    return cv_squared(load_E)


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy of the router distribution, in nats."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()
