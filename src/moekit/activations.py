"""gpt-oss's clamped SwiGLU, an expert activation with two parameters.

# R rows, F expert hidden, H = 2F (gate and up halves side by side)

Activations are named by strings ("swiglu", "gelu", ...; see config.ACTIVATIONS), except
this one, whose alpha and limit come from MoEConfig: the experts carry a ClampedSwiGLU
wherever they carry an activation name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import GATED_ACTIVATIONS


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's SwiGLU (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv:2508.10925).

    With the (gate, up) halves of h: gate' = min(gate, limit), up' = clamp(up, -limit,
    limit), out = (up' + 1) * gate' * sigmoid(alpha * gate'). The clamps bound the
    activations; alpha = 1.702 makes gate * sigmoid(alpha * gate) the sigmoid
    approximation of GELU (Hendrycks & Gimpel 2016). Passed wherever an activation name
    goes ("swiglu_clamped" alone means the defaults below).
    """

    alpha: float = 1.702
    limit: float = 7.0

    def __str__(self) -> str:
        return f"swiglu_clamped(alpha={self.alpha}, limit={self.limit})"

    def __call__(self, h_RH: Tensor) -> Tensor:
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        gate_RF, up_RF = gate_RF.clamp(max=self.limit), up_RF.clamp(-self.limit, self.limit)
        return (up_RF + 1) * gate_RF * torch.sigmoid(self.alpha * gate_RF)

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        """d out / dh by hand; a clamp passes the gradient where its input is in range
        (bounds included, as torch.clamp's backward)."""
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        gate_in_RF = gate_RF <= self.limit
        up_in_RF = (up_RF >= -self.limit) & (up_RF <= self.limit)
        gate_RF, up_RF = gate_RF.clamp(max=self.limit), up_RF.clamp(-self.limit, self.limit)
        sig_RF = torch.sigmoid(self.alpha * gate_RF)
        glu_RF = gate_RF * sig_RF
        # d(g * s(a g))/dg = s + a g s (1 - s)
        dglu_RF = sig_RF + self.alpha * glu_RF * (1 - sig_RF)
        grad_gate_RF = grad_a_RF * (up_RF + 1) * dglu_RF * gate_in_RF
        grad_up_RF = grad_a_RF * glu_RF * up_in_RF
        return torch.cat([grad_gate_RF, grad_up_RF], dim=-1)


def resolve_activation(
    activation: str | ClampedSwiGLU, alpha: float = 1.702, limit: float = 7.0
) -> str | ClampedSwiGLU:
    """The activation a name stands for: the name, or for "swiglu_clamped" a ClampedSwiGLU
    carrying alpha and limit (a ClampedSwiGLU passes through)."""
    return ClampedSwiGLU(alpha, limit) if activation == "swiglu_clamped" else activation


def is_gated(activation: str | ClampedSwiGLU) -> bool:
    """True for GLU activations, whose up projection has two halves (gate, up)."""
    return isinstance(activation, ClampedSwiGLU) or activation in GATED_ACTIVATIONS
