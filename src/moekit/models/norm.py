"""RMSNorm, shared by the blocks and the attention kinds, and the block norm a config picks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in fp32 so bf16 activations stay stable."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


# ModelConfig.norm -> the norm of every block and the final norm.
NORMS = ("rms", "layer")


def block_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm of a block (and the final norm) of width dim.

    Args:
        kind: "rms" (RMSNorm, weight only) or "layer" (LayerNorm with weight and bias, as
            Phi-3.5-MoE has).
        dim: the normalised width.
        eps: the epsilon of either.
    Returns:
        The norm module.
    """
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    return RMSNorm(dim, eps)
