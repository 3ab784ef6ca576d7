"""Which experts each token went to: a hook on the routers (each routing decision decodes
its own per-token expert ids, `decision.expert_ids(B, T)`), and the counts of those ids by
a label of the token.

# B batch, T tokens, K top_k, E experts, C capacity

Training (routing.jsonl), the report and Branch-Train-MiX all read routing this way.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..moe import MoE


@contextlib.contextmanager
def tap_routers(layers: nn.ModuleList, enabled: bool = True):
    """Yield a list with, per layer, the routing decision its MoE router made (None for
    dense layers), captured by a forward hook on the router while the context is open.

    The hook reads the decision the layer actually used (no second router call, so a noisy
    router's sample and the sigmoid router's load counts are untouched). It is the router's
    choice before capacity: an assignment capacity dropped still shows its expert.
    """
    routings: list = [None] * len(layers)
    handles = []
    if enabled:
        for i, block in enumerate(layers):
            if isinstance(block.ffn, MoE):

                def keep(module, args, output, i=i):
                    routings[i] = output

                handles.append(block.ffn.router.register_forward_hook(keep))
    try:
        yield routings
    finally:
        for handle in handles:
            handle.remove()


def label_expert_counts(
    ids_TK: Tensor, labels_T: Tensor, num_labels: int, num_experts: int
) -> Tensor:
    """(num_labels, num_experts) int64 counts of the assignments of each label's tokens.

    Every chosen slot counts once, so a row sums to the number of its tokens' valid
    assignments (K per token for top-k). Slots with id -1 are left out.

    Args:
        ids_TK: (..., K) expert ids, -1 for unused slots.
        labels_T: (...) label ids of the same tokens, in [0, num_labels).
    """
    if ids_TK.shape[:-1] != labels_T.shape:
        raise ValueError(
            f"ids shape {tuple(ids_TK.shape)} does not match labels shape {tuple(labels_T.shape)}"
        )
    ids_A = ids_TK.reshape(-1)
    labels_A = labels_T.reshape(-1, 1).expand(-1, ids_TK.shape[-1]).reshape(-1).to(ids_A.device)
    valid_A = ids_A >= 0
    flat_A = labels_A[valid_A].long() * num_experts + ids_A[valid_A]
    return torch.bincount(flat_A, minlength=num_labels * num_experts).view(num_labels, num_experts)
