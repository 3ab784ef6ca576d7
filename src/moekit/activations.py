"""Expert activations as objects: a name, gated or not, the forward and its backward by hand.

# R rows, F expert hidden, H = 2F for gated activations (gate and up halves side by side),
# else F

ACTIVATION_CLASSES is the one registry by name (config.ACTIVATIONS and MoEConfig.gated read
it).
A name is resolved once, when a module is built (resolve_activation); the experts then call
the object: `act(h_RH)` forward, `act.backward(h_RH, grad_a_RF)` in the hand-written
backward of the grouped experts (experts._GroupedMLP), with torch's fused backward kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """An expert nonlinearity. Subclasses set name and gated and define both passes.

    gated: a GLU, whose input h_RH holds the (gate, up) halves, so the up projection is
    twice the hidden width.
    """

    name: ClassVar[str]
    gated: ClassVar[bool]

    def __str__(self) -> str:
        return self.name

    def __call__(self, h_RH: Tensor) -> Tensor:
        """a_RF = act(h_RH)."""
        raise NotImplementedError

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        """grad_h_RH = d act(h) / dh applied to grad_a_RF."""
        raise NotImplementedError

    @classmethod
    def from_settings(cls, swiglu_alpha: float, swiglu_limit: float) -> Activation:
        """The activation with MoEConfig's settings; those without parameters ignore them."""
        return cls()


@dataclass(frozen=True)
class SwiGLU(Activation):
    """silu(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer"; Mixtral)."""

    name: ClassVar[str] = "swiglu"
    gated: ClassVar[bool] = True

    def __call__(self, h_RH: Tensor) -> Tensor:
        gate, up = h_RH.chunk(2, dim=-1)
        return F.silu(gate) * up

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            return self._backward_in_place(h_RH, grad_a_RF)  # writes in place: eager only
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        grad_gate_RF = aten.silu_backward(grad_a_RF * up_RF, gate_RF)
        grad_up_RF = grad_a_RF * F.silu(gate_RF)
        return torch.cat([grad_gate_RF, grad_up_RF], dim=-1)

    @staticmethod
    def _backward_in_place(h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        """The backward written straight into the two halves of grad_h.

        Four elementwise passes (silu, two products, torch's fused silu backward) instead of
        the eight of a sigmoid-based formula: this backward is memory-bound.
        """
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        grad_h_RH = torch.empty_like(h_RH)
        grad_gate_RF, grad_up_RF = grad_h_RH.chunk(2, dim=-1)
        torch.mul(grad_a_RF, F.silu(gate_RF), out=grad_up_RF)
        aten.silu_backward.grad_input(grad_a_RF * up_RF, gate_RF, grad_input=grad_gate_RF)
        return grad_h_RH


@dataclass(frozen=True)
class GeGLU(Activation):
    """gelu(gate) * up, tanh-approximated GELU (Shazeer 2020)."""

    name: ClassVar[str] = "geglu"
    gated: ClassVar[bool] = True

    def __call__(self, h_RH: Tensor) -> Tensor:
        gate, up = h_RH.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        grad_gate_RF = aten.gelu_backward(grad_a_RF * up_RF, gate_RF, approximate="tanh")
        grad_up_RF = grad_a_RF * F.gelu(gate_RF, approximate="tanh")
        return torch.cat([grad_gate_RF, grad_up_RF], dim=-1)


@dataclass(frozen=True)
class GELU(Activation):
    """tanh-approximated GELU (Hendrycks & Gimpel 2016)."""

    name: ClassVar[str] = "gelu"
    gated: ClassVar[bool] = False

    def __call__(self, h_RH: Tensor) -> Tensor:
        return F.gelu(h_RH, approximate="tanh")

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        return aten.gelu_backward(grad_a_RF, h_RH, approximate="tanh")


@dataclass(frozen=True)
class ReLU(Activation):
    name: ClassVar[str] = "relu"
    gated: ClassVar[bool] = False

    def __call__(self, h_RH: Tensor) -> Tensor:
        return F.relu(h_RH)

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        return aten.threshold_backward(grad_a_RF, h_RH, 0)


@dataclass(frozen=True)
class SiLU(Activation):
    name: ClassVar[str] = "silu"
    gated: ClassVar[bool] = False

    def __call__(self, h_RH: Tensor) -> Tensor:
        return F.silu(h_RH)

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        return aten.silu_backward(grad_a_RF, h_RH)


@dataclass(frozen=True)
class ClampedSwiGLU(Activation):
    """gpt-oss's SwiGLU (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv:2508.10925).

    With the (gate, up) halves of h: gate' = min(gate, limit), up' = clamp(up, -limit,
    limit), out = (up' + 1) * gate' * sigmoid(alpha * gate'). The clamps bound the
    activations; alpha = 1.702 makes gate * sigmoid(alpha * gate) the sigmoid
    approximation of GELU (Hendrycks & Gimpel 2016). Passed wherever an activation name
    goes ("swiglu_clamped" alone means the defaults below; MoEConfig's swiglu_alpha and
    swiglu_limit set them).
    """

    name: ClassVar[str] = "swiglu_clamped"
    gated: ClassVar[bool] = True
    alpha: float = 1.702
    limit: float = 7.0

    def __str__(self) -> str:
        return f"swiglu_clamped(alpha={self.alpha}, limit={self.limit})"

    @classmethod
    def from_settings(cls, swiglu_alpha: float, swiglu_limit: float) -> ClampedSwiGLU:
        return cls(swiglu_alpha, swiglu_limit)

    def __call__(self, h_RH: Tensor) -> Tensor:
        gate_RF, up_RF = h_RH.chunk(2, dim=-1)
        gate_RF, up_RF = gate_RF.clamp(max=self.limit), up_RF.clamp(-self.limit, self.limit)
        return (up_RF + 1) * gate_RF * torch.sigmoid(self.alpha * gate_RF)

    def backward(self, h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
        """A clamp passes the gradient where its input is in range (bounds included, as
        torch.clamp's backward)."""
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


# The registry: every activation by name, in the order config.ACTIVATIONS lists them.
ACTIVATION_CLASSES: dict[str, type[Activation]] = {
    cls.name: cls for cls in (SwiGLU, GeGLU, GELU, ReLU, SiLU, ClampedSwiGLU)
}


def resolve_activation(
    activation: str | Activation, alpha: float = 1.702, limit: float = 7.0
) -> Activation:
    """The activation object a name stands for (an object passes through); alpha and limit
    are MoEConfig's swiglu_alpha and swiglu_limit, used by swiglu_clamped alone."""
    if isinstance(activation, Activation):
        return activation
    if activation not in ACTIVATION_CLASSES:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATION_CLASSES)}"
        )
    return ACTIVATION_CLASSES[activation].from_settings(alpha, limit)
