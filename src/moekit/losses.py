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
    return cv_squared(_importance(weights_TK, ids_TK, num_experts))


def load_loss(load_E: Tensor) -> Tensor:
    """Shazeer et al. 2017 eq. (11): CV^2 of the (smooth) per-expert load."""
    return cv_squared(load_E)


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy of the router distribution, in nats."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()


# Scopes (MoEConfig.balance_scope). The balance, importance and load losses above count
# the load over the tokens of one forward: the micro-batch scope. The sequence scope
# computes each loss per sequence (row) and averages (DeepSeek-V3's sequence-wise loss,
# eq. 17-20). The global scope counts over every token of the optimizer step: before the
# step the trainer runs the step's micro-batches once without gradients, summing
# `balance_sums` per layer (and over the data-parallel ranks), and each micro-batch's
# forward then forms the loss from those global means with its own tokens' share live:
#     mean_E = global_E + (local_E - local_E.detach())
# so the value is the global batch's loss and the gradients of the micro-batches add up
# (each micro-batch weighted 1 / micro-batches, averaged over ranks) to the gradient of
# the global loss: f is a count (no gradient), P, the importance and the smooth load are
# means over tokens, and the CV^2 does not depend on the scale of its argument.

BALANCE_SUM_ROWS = ("assignments", "probability", "importance", "load")


def balance_sums(
    probs_TE: Tensor,
    ids_TK: Tensor,
    valid_TK: Tensor | None,
    weights_TK: Tensor,
    load_TE: Tensor | None,
) -> Tensor:
    """(4, E) fp32 sums over the tokens, detached, in BALANCE_SUM_ROWS order: the
    assignments each expert got (before capacity), the router probability, the combine
    weight (importance) and the load (smooth per-token estimate, or the assignments)."""
    E = probs_TE.shape[-1]
    counts_E = expert_counts(ids_TK, E, valid_TK).float()
    importance_E = _importance(weights_TK.detach(), ids_TK, E)
    load_E = counts_E if load_TE is None else load_TE.detach().float().sum(dim=0)
    return torch.stack([counts_E, probs_TE.detach().float().sum(dim=0), importance_E, load_E])


def global_means(sums_4E: Tensor, num_tokens: Tensor) -> Tensor:
    """The (4, E) reference a global-scope layer balances against, from summed
    balance_sums: the assignment fractions (summing to 1) and the per-token means of the
    probability, importance and load."""
    fraction_E = sums_4E[0] / sums_4E[0].sum().clamp_min(1.0)
    return torch.cat([fraction_E[None], sums_4E[1:] / num_tokens.clamp_min(1.0)])


def global_balance_losses(
    reference_4E: Tensor,
    probs_TE: Tensor,
    weights_TK: Tensor,
    ids_TK: Tensor,
    load_TE: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(balance, importance, load) of the global scope: the values of the whole step's
    tokens (reference_4E from global_means), the gradients of this micro-batch's share."""
    T, E = probs_TE.shape
    fraction_E, probs_E, importance_E, load_E = reference_4E
    balance = E * torch.dot(fraction_E, _live(probs_E, probs_TE.mean(dim=0)))
    local_importance_E = _importance(weights_TK, ids_TK, E) / max(T, 1)
    importance = cv_squared(_live(importance_E, local_importance_E))
    if load_TE is None:  # a hard count: no gradient, the global value
        load = cv_squared(load_E)
    else:
        load = cv_squared(_live(load_E, load_TE.float().mean(dim=0)))
    return balance, importance, load


def sequence_balance_losses(
    rows: int,
    probs_TE: Tensor,
    weights_TK: Tensor,
    ids_TK: Tensor,
    valid_TK: Tensor | None,
    load_TE: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(balance, importance, load) of the sequence scope: each computed over the tokens of
    one sequence (the T tokens are `rows` sequences of equal length, row-major), then
    averaged over the sequences. The balance is DeepSeek-V3's L_Bal (eq. 17-20) with
    f_i = E / (K T) * (assignments of expert i): N * sum_i f_i P_i per sequence."""
    T, E = probs_TE.shape
    B = rows
    ones = torch.ones_like(ids_TK) if valid_TK is None else valid_TK.long()
    counts_BE = torch.zeros(B, E, dtype=torch.long, device=ids_TK.device).scatter_add_(
        1, ids_TK.reshape(B, -1), ones.reshape(B, -1)
    )
    counts_BE = counts_BE.to(probs_TE.dtype)
    fraction_BE = counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp_min(1.0)
    probs_BE = probs_TE.reshape(B, -1, E).mean(dim=1)
    balance = E * (fraction_BE * probs_BE).sum(dim=-1).mean()
    importance_BE = weights_TK.new_zeros(B, E).scatter_add(
        1, ids_TK.reshape(B, -1), weights_TK.reshape(B, -1)
    )
    load_BE = counts_BE if load_TE is None else load_TE.float().reshape(B, -1, E).sum(dim=1)
    return balance, cv_squared_rows(importance_BE).mean(), cv_squared_rows(load_BE).mean()


def cv_squared_rows(values_BE: Tensor) -> Tensor:
    """cv_squared of each row of a (B, E) tensor: (B,)."""
    values_BE = values_BE.float()
    if values_BE.shape[-1] <= 1:
        return values_BE.new_zeros(values_BE.shape[0])
    return values_BE.var(dim=-1, correction=0) / (values_BE.mean(dim=-1).square() + 1e-10)


def _importance(weights_TK: Tensor, ids_TK: Tensor, num_experts: int) -> Tensor:
    """(E,) the sum of each expert's combine weights over the tokens."""
    return weights_TK.new_zeros(num_experts).index_add(0, ids_TK.flatten(), weights_TK.flatten())


def _live(reference: Tensor, local: Tensor) -> Tensor:
    """reference's value with local's gradient: the global mean, this micro-batch live."""
    return reference + (local - local.detach())
