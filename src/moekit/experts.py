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


def _swiglu_backward(h_RH: Tensor, grad_a_RF: Tensor) -> Tensor:
    """d(silu(gate) * up) by hand, written straight into the two halves of grad_h.

    Four elementwise passes (silu, two products, torch's fused silu backward) instead of the
    eight of a sigmoid-based formula: this backward is memory-bound.
    """
    gate_RF, up_RF = h_RH.chunk(2, dim=-1)
    grad_h_RH = torch.empty_like(h_RH)
    grad_gate_RF, grad_up_RF = grad_h_RH.chunk(2, dim=-1)
    torch.mul(grad_a_RF, F.silu(gate_RF), out=grad_up_RF)
    torch.ops.aten.silu_backward.grad_input(grad_a_RF * up_RF, gate_RF, grad_input=grad_gate_RF)
    return grad_h_RH


def _activation_backward(h_RH: Tensor, grad_a_RF: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        return _swiglu_backward(h_RH, grad_a_RF)
    with torch.enable_grad():
        h = h_RH.detach().requires_grad_()
        (grad_h_RH,) = torch.autograd.grad(activate(h, activation), h, grad_a_RF)
    return grad_h_RH


# Without avx512_bf16/AMX, torch's CPU bf16 GEMM falls back to a kernel whose
# (row-major) @ (row-major) case is ~20x slower than any case with a transposed operand
# (0.5 vs 14 GFLOP/s at d=512, h=2048 on Zen 3). fp32 goes to MKL, where it makes no
# difference, so only reduced-precision forward GEMMs take a column-major copy of the rows
# (R x K, far smaller than the E x K x N weights a transposed weight copy would move).
_SLOW_ROW_MAJOR_GEMM = (torch.bfloat16, torch.float16)


def _grouped_mm(a_RK: Tensor, w_EKN: Tensor, groups: list[tuple[int, int, int]]) -> Tensor:
    """out[start:end] = a_RK[start:end] @ w_EKN[e] for each (e, start, end) group."""
    out_RN = a_RK.new_empty(a_RK.shape[0], w_EKN.shape[-1])
    both_row_major = w_EKN.stride(-1) == 1
    if both_row_major and a_RK.dtype in _SLOW_ROW_MAJOR_GEMM and a_RK.device.type == "cpu":
        a_RK = a_RK.t().contiguous().t()
    for e, start, end in groups:
        torch.mm(a_RK[start:end], w_EKN[e], out=out_RN[start:end])
    return out_RN


def _grouped_weight_grad(a_RK: Tensor, grad_RN: Tensor, groups, num_experts: int) -> Tensor:
    """grad_w[e] = a_RK[rows of e].T @ grad_RN[rows of e], in one (E, K, N) buffer."""
    grad_w_EKN = a_RK.new_empty(num_experts, a_RK.shape[-1], grad_RN.shape[-1])
    if len(groups) < num_experts:  # experts without rows get an exact zero gradient
        idle = sorted(set(range(num_experts)) - {e for e, _, _ in groups})
        grad_w_EKN[idle] = 0
    for e, start, end in groups:
        torch.mm(a_RK[start:end].t(), grad_RN[start:end], out=grad_w_EKN[e])
    return grad_w_EKN


class _GroupedMLP(torch.autograd.Function):
    """y_RD = act(x_RD @ w_up[e]) @ w_down[e] for each expert's rows, one autograd node."""

    @staticmethod
    def forward(ctx, x_RD, w_up_EDH, w_down_EFD, groups, activation):
        dtype = _compute_dtype(x_RD)
        x_RD, w_up, w_down = x_RD.to(dtype), w_up_EDH.to(dtype), w_down_EFD.to(dtype)
        h_RH = _grouped_mm(x_RD, w_up, groups)
        a_RF = activate(h_RH, activation)
        y_RD = _grouped_mm(a_RF, w_down, groups)
        # a_RF is kept (not recomputed) for the w_down gradient.
        ctx.save_for_backward(x_RD, h_RH, a_RF, w_up, w_down)
        ctx.groups, ctx.activation = groups, activation
        ctx.param_dtypes = (w_up_EDH.dtype, w_down_EFD.dtype)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RH, a_RF, w_up, w_down = ctx.saved_tensors
        groups, num_experts = ctx.groups, w_up.shape[0]
        # An expanded (stride-0) gradient, e.g. from .sum(), must not reach the GEMMs.
        grad_y_RD = grad_y_RD.to(x_RD.dtype).contiguous()
        # Backward GEMMs are (rows) @ w.T and rows.T @ (rows): transposed operands, fast in
        # every dtype. 1. through w_down, 2. the activation, 3. through w_up.
        grad_a_RF = _grouped_mm(grad_y_RD, w_down.transpose(1, 2), groups)
        grad_w_down = _grouped_weight_grad(a_RF, grad_y_RD, groups, num_experts)
        grad_h_RH = _activation_backward(h_RH, grad_a_RF, ctx.activation)
        grad_x_RD = _grouped_mm(grad_h_RH, w_up.transpose(1, 2), groups)
        grad_w_up = _grouped_weight_grad(x_RD, grad_h_RH, groups, num_experts)
        up_dtype, down_dtype = ctx.param_dtypes
        return grad_x_RD, grad_w_up.to(up_dtype), grad_w_down.to(down_dtype), None, None


def _groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) row ranges of the experts that have rows."""
    groups, start = [], 0
    for e, count in enumerate(counts):
        if count:
            groups.append((e, start, start + count))
        start += count
    return groups


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
        return _GroupedMLP.apply(x_RD, self.w_up, self.w_down, _groups(counts), self.activation)

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
