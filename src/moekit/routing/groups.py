"""Group-limited selection of DeepSeek's routers: a token may only use its best groups.

# T tokens, E experts, G groups, X experts per group

Experts are split into num_groups equal groups of consecutive ids; each token scores every
group, keeps its topk_groups best, and picks its top_k experts inside them. The group
score differs: DeepSeek-V2 ("device-limited routing", arXiv:2405.04434 section 2.2.2)
takes the best expert's score in the group; DeepSeek-V3 (arXiv:2412.19437 section 2.1.2)
the sum of the two best biased scores.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_max(grouped_TGX: Tensor) -> Tensor:
    """DeepSeek-V2's group score: the best score in the group."""
    return grouped_TGX.amax(dim=-1)


def group_top2_sum(grouped_TGX: Tensor) -> Tensor:
    """DeepSeek-V3's group score: the sum of the two best scores (the one, in groups of one)."""
    per_group = min(2, grouped_TGX.shape[-1])
    return grouped_TGX.topk(per_group, dim=-1).values.sum(dim=-1)


def group_limited(scores_TE: Tensor, num_groups: int, keep: int, group_score) -> Tensor:
    """scores_TE with -inf outside each token's `keep` best groups (as scored by group_score).

    Args:
        scores_TE: the scores experts are ranked by.
        num_groups: G, dividing E; 1 returns scores_TE unchanged.
        keep: groups each token may use.
        group_score: (T, G, X) -> (T, G), e.g. group_max or group_top2_sum.
    """
    if num_groups == 1:
        return scores_TE
    T, E = scores_TE.shape
    grouped_TGX = scores_TE.view(T, num_groups, E // num_groups)
    group_score_TG = group_score(grouped_TGX)
    best_TG = group_score_TG.topk(keep, dim=-1).indices
    allowed_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    allowed_TE = allowed_TG.unsqueeze(-1).expand_as(grouped_TGX).reshape_as(scores_TE)
    return scores_TE.masked_fill(~allowed_TE, float("-inf"))
