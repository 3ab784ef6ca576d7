"""Routed experts: E MLPs stored as 3-D weights and run over expert-grouped rows.

# R routed rows (grouped by expert), D model, F expert hidden, E experts
# H = 2F for gated activations (gate and up halves side by side), else F

`GroupedExperts.forward` is the fast path: one autograd node for all experts, whose
backward writes every expert's weight gradient into one (E, ...) buffer. Indexing w[e] in
a Python loop under autograd instead makes autograd build a full-size zero gradient per
expert and sum them (the profile of transformers' eager Mixtral block spends most of its
backward in that fill). `forward_reference` is the plain loop, kept as the oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activate(h_RH: Tensor, activation: str) -> Tensor:
    """The expert nonlinearity; GLU variants split h into (gate, up) halves."""
    if activation == "swiglu":
        gate, up = h_RH.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h_RH.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    if activation == "gelu":
        return F.gelu(h_RH, approximate="tanh")
    if activation == "relu":
        return F.relu(h_RH)
    if activation == "silu":
        return F.silu(h_RH)
    raise ValueError(f"unknown activation {activation!r}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _GroupedMLP(torch.autograd.Function):
    """y_RD = act(x_RD @ w_up[e]) @ w_down[e] for each expert's rows, one autograd node."""

    @staticmethod
    def forward(ctx, x_RD, w_up_EDH, w_down_EFD, counts, activation):
        dtype = _compute_dtype(x_RD)
        x_RD, w_up, w_down = x_RD.to(dtype), w_up_EDH.to(dtype), w_down_EFD.to(dtype)
        R = x_RD.shape[0]
        h_RH = x_RD.new_empty(R, w_up.shape[-1])
        y_RD = x_RD.new_empty(R, w_down.shape[-1])
        bounds = _bounds(counts)
        for e, (start, end) in enumerate(bounds):
            if end > start:
                torch.matmul(x_RD[start:end], w_up[e], out=h_RH[start:end])
        a_RF = activate(h_RH, activation)
        for e, (start, end) in enumerate(bounds):
            if end > start:
                torch.matmul(a_RF[start:end], w_down[e], out=y_RD[start:end])
        ctx.save_for_backward(x_RD, h_RH, w_up, w_down)
        ctx.bounds, ctx.activation = bounds, activation
        ctx.param_dtypes = (w_up_EDH.dtype, w_down_EFD.dtype)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RH, w_up, w_down = ctx.saved_tensors
        grad_y_RD = grad_y_RD.to(x_RD.dtype).contiguous()
        with torch.enable_grad():
            h = h_RH.detach().requires_grad_()
            a_RF = activate(h, ctx.activation)
        grad_a_RF = torch.empty_like(a_RF)
        grad_w_down = torch.zeros_like(w_down)
        for e, (start, end) in enumerate(ctx.bounds):
            if end > start:
                torch.matmul(grad_y_RD[start:end], w_down[e].t(), out=grad_a_RF[start:end])
                torch.matmul(a_RF[start:end].t().detach(), grad_y_RD[start:end], out=grad_w_down[e])
        (grad_h_RH,) = torch.autograd.grad(a_RF, h, grad_a_RF)
        grad_x_RD = torch.empty_like(x_RD)
        grad_w_up = torch.zeros_like(w_up)
        for e, (start, end) in enumerate(ctx.bounds):
            if end > start:
                torch.matmul(grad_h_RH[start:end], w_up[e].t(), out=grad_x_RD[start:end])
                torch.matmul(x_RD[start:end].t(), grad_h_RH[start:end], out=grad_w_up[e])
        up_dtype, down_dtype = ctx.param_dtypes
        return grad_x_RD, grad_w_up.to(up_dtype), grad_w_down.to(down_dtype), None, None


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(counts).cumsum(0).tolist() if counts else []
    return [(end - count, end) for count, end in zip(counts, ends)]


class GroupedExperts(nn.Module):
    """E feed-forward experts with weights w_up (E, D, H) and w_down (E, F, D).

    Args:
        num_experts, d_model, d_hidden: E, D, F.
        activation: swiglu (default, as Mixtral), geglu, gelu, relu or silu.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        gated = activation in ("swiglu", "geglu")
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_hidden * (2 if gated else 1)))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.uniform_(self.w_up, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_down, -1 / math.sqrt(self.d_hidden), 1 / math.sqrt(self.d_hidden))

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Run each expert on its rows.

        Args:
            x_RD: rows grouped by expert; counts_E: (E,) rows per expert, sum <= R.
        Returns:
            y_RD: (sum(counts_E), D).
        """
        counts = counts_E.tolist()
        x_RD = x_RD[: sum(counts)]
        return _GroupedMLP.apply(x_RD, self.w_up, self.w_down, counts, self.activation)

    def forward_reference(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """The obviously-correct loop (slow backward); the fast path must equal it."""
        outputs, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            h = x_RD[start : start + count] @ self.w_up[e]
            outputs.append(activate(h, self.activation) @ self.w_down[e])
            start += count
        return torch.cat(outputs) if outputs else x_RD[:0]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, "
            f"d_hidden={self.d_hidden}, activation={self.activation}"
        )


class MLP(nn.Module):
    """A dense feed-forward block with the experts' activation (the shared experts)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        gated = activation in ("swiglu", "geglu")
        self.up = nn.Linear(d_model, d_hidden * (2 if gated else 1), bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(activate(self.up(x), self.activation))


class ModuleExperts(nn.Module):
    """Heterogeneous experts: any nn.Module per expert (the classic 1991 mixture).

    Slower than GroupedExperts (a Python loop), but each expert may differ in width or kind.
    """

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts_E.tolist()):
            outputs.append(expert(x_RD[start : start + count]))
            start += count
        return torch.cat(outputs) if outputs else x_RD[:0]
