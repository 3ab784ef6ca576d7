"""Routing statistics as pure functions: counts of who went where, and what they tell.

# T tokens, K top_k, E experts, D domains (or class labels)

A routing decision is `ids_TK` (the experts each token chose; -1 marks an unused slot, as
`ModelOutput.expert_ids` does for top_p) plus, for each token, a label: the domain of the
document it came from, or a class. Everything here works on counts, so statistics from
many batches add up before they are interpreted.
"""

from __future__ import annotations

import numpy as np

from ..models.expert_ids import label_expert_counts

__all__ = [
    "entropy_bits",
    "label_expert_counts",
    "load_cv",
    "mutual_information",
    "normalised_rows",
]


def mutual_information(counts_DE) -> float:
    """Mutual information I(label; expert) in bits of a joint count table.

    0 when every label spreads its tokens over the experts in the same proportions; at
    most min(log2 D, log2 E), reached when each label has its own experts and the labels
    are equally frequent. Rows or columns of zeros do not change it.
    """
    joint = np.asarray(counts_DE, dtype=np.float64)
    total = joint.sum()
    if joint.ndim != 2 or (joint < 0).any():
        raise ValueError(
            f"counts must be a 2-D table of non-negative counts, got shape {joint.shape}"
        )
    if total == 0:
        return 0.0
    p_DE = joint / total
    p_D1 = p_DE.sum(axis=1, keepdims=True)
    p_1E = p_DE.sum(axis=0, keepdims=True)
    nonzero = p_DE > 0
    ratio = p_DE[nonzero] / (p_D1 @ p_1E)[nonzero]
    return float((p_DE[nonzero] * np.log2(ratio)).sum())


def entropy_bits(counts) -> float:
    """Shannon entropy in bits of the distribution the counts define (0 for no counts)."""
    p = np.asarray(counts, dtype=np.float64).ravel()
    total = p.sum()
    if total == 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log2(p)).sum())


def load_cv(tokens_per_expert) -> float:
    """Coefficient of variation (std / mean, population std) of the expert loads.

    0 for a perfectly balanced layer, sqrt(E - 1) when one expert takes everything.
    """
    load = np.asarray(tokens_per_expert, dtype=np.float64).ravel()
    if load.size <= 1 or load.mean() == 0:
        return 0.0
    return float(load.std() / load.mean())


def normalised_rows(counts_DE) -> np.ndarray:
    """Each row divided by its sum (the share of a label's assignments per expert)."""
    counts = np.asarray(counts_DE, dtype=np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
