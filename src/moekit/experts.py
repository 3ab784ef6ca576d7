"""Routed experts: E MLPs stored as 3-D weights and run over expert-grouped rows.

# R routed rows (grouped by expert), D model, F expert hidden, E experts
# H = 2F for gated activations (gate and up halves side by side), else F
# With expert_bias, b_up (E, H) and b_down (E, D) are added after each projection.

`GroupedExperts.forward` is the fast path: one autograd node for all experts, whose
backward writes every expert's weight gradient into one (E, ...) buffer. Indexing w[e] in
a Python loop under autograd instead makes autograd build a full-size zero gradient per
expert and sum them (the profile of transformers' eager Mixtral block spends most of its
backward in that fill). `forward_reference` is the plain loop, kept as the oracle.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, resolve_activation
from .config import EXPERT_BACKENDS


def _compute_dtype(t: Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


# Without avx512_bf16/AMX, torch's CPU bf16 GEMM falls back to a kernel whose
# (row-major) @ (row-major) case is ~20x slower than any case with a transposed operand
# (0.5 vs 14 GFLOP/s at d=512, h=2048 on Zen 3). fp32 goes to MKL, where it makes no
# difference, so only reduced-precision forward GEMMs take a column-major copy of the rows
# (R x K, far smaller than the E x K x N weights a transposed weight copy would move).
_SLOW_ROW_MAJOR_GEMM = (torch.bfloat16, torch.float16)


# grouped_mm as opaque ops for torch.compile: torch's own fake (meta) kernel accepts bf16
# only, as CUDA's kernels do, while the CPU kernel also runs fp32. Eager calls go straight
# to F.grouped_mm; compiled graphs call these, whose fakes give the shapes.
@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm_op(a_RK: Tensor, w_EKN: Tensor, offsets_E: Tensor) -> Tensor:
    return F.grouped_mm(a_RK, w_EKN, offs=offsets_E).contiguous()


@_grouped_mm_op.register_fake
def _(a_RK: Tensor, w_EKN: Tensor, offsets_E: Tensor) -> Tensor:
    return a_RK.new_empty(a_RK.shape[0], w_EKN.shape[-1])


@torch.library.custom_op("moekit::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad_op(a_RK: Tensor, grad_RN: Tensor, offsets_E: Tensor) -> Tensor:
    return F.grouped_mm(a_RK.t(), grad_RN, offs=offsets_E).contiguous()


@_grouped_weight_grad_op.register_fake
def _(a_RK: Tensor, grad_RN: Tensor, offsets_E: Tensor) -> Tensor:
    return a_RK.new_empty(offsets_E.shape[0], a_RK.shape[-1], grad_RN.shape[-1])


class ExpertGroups:
    """Where each expert's rows are: offsets on the device, and (loop only) Python ranges.

    What the seams of GroupedExperts (`run_experts`, `project`) receive: `grouped_linear`
    multiplies rows by per-expert weights over these groups.

    offsets_E: int32 end row of each expert's group (cumsum of counts), as grouped_mm takes
    them; rows past offsets_E[-1] (capacity padding) are never computed and hold garbage.
    ranges: (expert, start, end) of the experts with rows, read from the host (a sync),
    or None for the grouped_mm backend.
    """

    def __init__(self, offsets_E: Tensor, ranges: list[tuple[int, int, int]] | None):
        self.backend = "grouped_mm" if ranges is None else "loop"
        self.num_experts = offsets_E.shape[0]
        self.offsets_E, self.ranges = offsets_E, ranges

    @staticmethod
    def host_ranges(counts_E: Tensor) -> list[tuple[int, int, int]]:
        """(expert, start, end) of the experts with rows: the loop's one host sync."""
        ranges, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            if count:
                ranges.append((e, start, start + count))
            start += count
        return ranges

    def mm(self, a_RK: Tensor, w_EKN: Tensor) -> Tensor:
        """out[rows of e] = a_RK[rows of e] @ w_EKN[e]; rows past the last group unset."""
        if self.backend == "grouped_mm":
            if torch.compiler.is_compiling():
                return _grouped_mm_op(a_RK, w_EKN, self.offsets_E)
            return F.grouped_mm(a_RK, w_EKN, offs=self.offsets_E)
        out_RN = a_RK.new_empty(a_RK.shape[0], w_EKN.shape[-1])
        both_row_major = w_EKN.stride(-1) == 1
        if both_row_major and a_RK.dtype in _SLOW_ROW_MAJOR_GEMM and a_RK.device.type == "cpu":
            a_RK = a_RK.t().contiguous().t()
        for e, start, end in self.ranges:
            torch.mm(a_RK[start:end], w_EKN[e], out=out_RN[start:end])
        if self.ranges:
            out_RN[self.ranges[-1][2] :] = 0
        else:
            out_RN.zero_()
        return out_RN

    def row_experts(self, num_rows: int) -> Tensor:
        """The expert of each of num_rows rows, (R,) long; padding rows past the last group
        take the last expert (a bias added there is never read)."""
        return _row_experts(self.offsets_E, num_rows).clamp(max=self.num_experts - 1)

    def weight_grad(self, a_RK: Tensor, grad_RN: Tensor) -> Tensor:
        """grad_w[e] = a_RK[rows of e].T @ grad_RN[rows of e], in one (E, K, N) buffer.

        Experts without rows get an exact zero gradient.
        """
        if self.backend == "grouped_mm":
            if torch.compiler.is_compiling():
                return _grouped_weight_grad_op(a_RK, grad_RN, self.offsets_E)
            return F.grouped_mm(a_RK.t(), grad_RN, offs=self.offsets_E)
        E = self.num_experts
        grad_w_EKN = a_RK.new_empty(E, a_RK.shape[-1], grad_RN.shape[-1])
        if len(self.ranges) < E:
            idle = sorted(set(range(E)) - {e for e, _, _ in self.ranges})
            grad_w_EKN[idle] = 0
        for e, start, end in self.ranges:
            torch.mm(a_RK[start:end].t(), grad_RN[start:end], out=grad_w_EKN[e])
        return grad_w_EKN


def _row_experts(offsets_E: Tensor, num_rows: int) -> Tensor:
    """The expert of each row, (R,) long; E for the padding rows past the last group."""
    rows_R = torch.arange(num_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows_R, right=True)


def _bias_grad(grad_RN: Tensor, experts_R: Tensor, num_experts: int) -> Tensor:
    """grad_b[e] = sum of grad_RN over the rows of e; padding rows (expert E) are dropped."""
    grad_EN = grad_RN.new_zeros(num_experts + 1, grad_RN.shape[-1])
    return grad_EN.index_add_(0, experts_R, grad_RN)[:num_experts]


class _GroupedMLP(torch.autograd.Function):
    """y_RD = act(x_RD @ w_up[e] + b_up[e]) @ w_down[e] + b_down[e] for each expert's rows
    (no biases when b_up, b_down are None), one autograd node."""

    @staticmethod
    def forward(ctx, x_RD, w_up_EDH, w_down_EFD, offsets_E, ranges, activation, b_up, b_down):
        groups = ExpertGroups(offsets_E, ranges)
        dtype = _compute_dtype(x_RD)
        x_RD, w_up, w_down = x_RD.to(dtype), w_up_EDH.to(dtype), w_down_EFD.to(dtype)
        h_RH = groups.mm(x_RD, w_up)
        experts_R = None
        if b_up is not None:
            experts_R = _row_experts(offsets_E, x_RD.shape[0])
            bias_rows_R = experts_R.clamp(max=offsets_E.shape[0] - 1)  # padding: any expert
            h_RH = h_RH + b_up.to(dtype).index_select(0, bias_rows_R)
        a_RF = activation(h_RH)
        y_RD = groups.mm(a_RF, w_down)
        if b_down is not None:
            y_RD = y_RD + b_down.to(dtype).index_select(0, bias_rows_R)
        # a_RF is kept (not recomputed) for the w_down gradient.
        ctx.save_for_backward(x_RD, h_RH, a_RF, w_up, w_down, experts_R)
        ctx.groups, ctx.activation = groups, activation
        ctx.param_dtypes = (w_up_EDH.dtype, w_down_EFD.dtype)
        ctx.bias_dtypes = None if b_up is None else (b_up.dtype, b_down.dtype)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RH, a_RF, w_up, w_down, experts_R = ctx.saved_tensors
        groups = ctx.groups
        # An expanded (stride-0) gradient, e.g. from .sum(), must not reach the GEMMs.
        grad_y_RD = grad_y_RD.to(x_RD.dtype).contiguous()
        # Backward GEMMs are (rows) @ w.T and rows.T @ (rows): transposed operands, fast in
        # every dtype. 1. through w_down, 2. the activation, 3. through w_up.
        grad_a_RF = groups.mm(grad_y_RD, w_down.transpose(1, 2))
        grad_w_down = groups.weight_grad(a_RF, grad_y_RD)
        grad_h_RH = ctx.activation.backward(h_RH, grad_a_RF)
        grad_x_RD = groups.mm(grad_h_RH, w_up.transpose(1, 2))
        grad_w_up = groups.weight_grad(x_RD, grad_h_RH)
        up_dtype, down_dtype = ctx.param_dtypes
        grad_b_up = grad_b_down = None
        if ctx.bias_dtypes is not None:
            E = groups.num_experts
            grad_b_up = _bias_grad(grad_h_RH, experts_R, E).to(ctx.bias_dtypes[0])
            grad_b_down = _bias_grad(grad_y_RD, experts_R, E).to(ctx.bias_dtypes[1])
        return (
            grad_x_RD,
            grad_w_up.to(up_dtype),
            grad_w_down.to(down_dtype),
            None,
            None,
            None,
            grad_b_up,
            grad_b_down,
        )


class _GroupedLinear(torch.autograd.Function):
    """out[rows of e] = x_RK[rows of e] @ w_EKN[e]: one grouped GEMM, one autograd node."""

    @staticmethod
    def forward(ctx, x_RK, w_EKN, groups):
        ctx.save_for_backward(x_RK, w_EKN)
        ctx.groups = groups
        return groups.mm(x_RK, w_EKN)

    @staticmethod
    def backward(ctx, grad_RN):
        x_RK, w_EKN = ctx.saved_tensors
        grad_RN = grad_RN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.groups.mm(grad_RN, w_EKN.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_w = ctx.groups.weight_grad(x_RK, grad_RN)
        return grad_x, grad_w, None


def grouped_linear(a_RK: Tensor, w_EKN: Tensor, groups: ExpertGroups) -> Tensor:
    """out_RN[rows of e] = a_RK[rows of e] @ w_EKN[e] (w cast to a's dtype), one autograd
    node; a weight that needs no gradient (frozen) gets none computed.

    Args:
        a_RK: rows grouped by expert; w_EKN: (E, K, N) per-expert weights.
    Returns:
        out_RN; rows past the last group are unset (grouped_mm) or zero (loop).
    """
    return _GroupedLinear.apply(a_RK, w_EKN.to(a_RK.dtype), groups)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Whether torch's grouped_mm runs this compute dtype and these row widths on device.

    CPU: fp32 and bf16. CUDA: bf16 on compute capability >= 8.0. Every row must start on
    a 16-byte boundary (the kernels' layout rule), so width * itemsize % 16 == 0.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16)
    elif device.type == "cuda":
        ok_dtype = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    else:
        ok_dtype = False
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ok_dtype and all(width * itemsize % 16 == 0 for width in widths)


def choose_backend(requested: str, x: Tensor, *widths: int) -> str:
    """The expert backend for a call on rows x: `requested`, with "auto" resolved and a
    clean fallback to the loop where grouped_mm does not support the compute dtype (x's,
    or autocast's), the device or the widths. Reads only x's dtype and device.

    Rule for "auto" (measured, docs/benchmarks.md): grouped_mm wherever it is supported.
    On the CPU it runs as fast as the per-expert loop (within the run-to-run noise at every
    standard shape, fp32 and bf16), and it needs no host synchronisation and compiles into
    one graph.
    """
    dtype = _compute_dtype(x) if x.is_floating_point() else x.dtype
    if requested == "loop" or not grouped_mm_supported(dtype, x.device, *widths):
        return "loop"
    return "grouped_mm"


class GroupedExperts(nn.Module):
    """E feed-forward experts with weights w_up (E, D, H) and w_down (E, F, D).

    Args:
        num_experts, d_model, d_hidden: E, D, F.
        activation: an activations.Activation, or its name: swiglu (default, as Mixtral),
            geglu, gelu, relu, silu, swiglu_clamped (gpt-oss; the name alone takes the
            default alpha and limit). Resolved here, once.
        backend: "auto" (grouped_mm where supported, else the loop), "grouped_mm" (torch's
            grouped GEMM; falls back to the loop where unsupported) or "loop" (one torch.mm
            per expert after reading the counts on the host).
        bias: biases b_up (E, H) and b_down (E, D) after the two projections (gpt-oss).

    Seams for subclasses that compute differently (LoRA's adapters, a low-precision
    variant): set `fused = False`, and forward runs `run_experts(x_RD, groups)`, whose two
    projections go through `project(a_RK, projection, groups)`; override either, and
    `gemm_widths()` when the GEMMs take other row widths. `plain_weights` says whether
    code outside may read w_up, w_down (and the biases) as the experts' whole function.
    """

    # True: forward runs the fused MLP, one autograd node whose backward is written by hand
    # (_GroupedMLP). False: forward runs run_experts, one autograd node per GEMM.
    fused: ClassVar[bool] = True
    # True: the experts are exactly w_up, w_down (b_up, b_down) through the activation, all
    # num_experts of them, so the small-batch path (forward_gathered, MoE.gathers_experts)
    # and expert parallelism (parallel.apply slices them) may use the weights directly.
    plain_weights: ClassVar[bool] = True

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str | Activation = "swiglu",
        backend: str = "auto",
        bias: bool = False,
    ):
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(
                f"unknown expert backend {backend!r}; choose one of {', '.join(EXPERT_BACKENDS)}"
            )
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.backend = resolve_activation(activation), backend
        H = d_hidden * (2 if self.activation.gated else 1)
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, H))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b_up = nn.Parameter(torch.empty(num_experts, H)) if bias else None
        self.b_down = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too.
        up, down = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
        nn.init.uniform_(self.w_up, -up, up)
        nn.init.uniform_(self.w_down, -down, down)
        if self.b_up is not None:
            nn.init.uniform_(self.b_up, -up, up)
            nn.init.uniform_(self.b_down, -down, down)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Run each expert on its rows.

        Args:
            x_RD: rows grouped by expert (counts_E[0] rows for expert 0, then expert 1, ...);
                rows past sum(counts_E) are padding (capacity's dropped slots).
            counts_E: (E,) rows per expert, sum <= R.
        Returns:
            y_RD: (R, D); padding rows are zero for the loop, unspecified for grouped_mm
            (the plans never read them).
        """
        backend = choose_backend(self.backend, x_RD, *self.gemm_widths())
        ranges = ExpertGroups.host_ranges(counts_E) if backend == "loop" else None
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        if not self.fused:
            return self.run_experts(x_RD, ExpertGroups(offsets_E, ranges))
        return _GroupedMLP.apply(
            x_RD,
            self.w_up,
            self.w_down,
            offsets_E,
            ranges,
            self.activation,
            self.b_up,
            self.b_down,
        )

    def gemm_widths(self) -> tuple[int, ...]:
        """Seam: the row widths of every GEMM forward runs (grouped_mm needs each row on a
        16-byte boundary; choose_backend falls back to the loop otherwise)."""
        return (self.d_model, self.w_up.shape[-1], self.d_hidden)

    def run_experts(self, x_RD: Tensor, groups: ExpertGroups) -> Tensor:
        """Seam: each expert's MLP on its rows, composed of autograd ops (fused = False).

        up projection, + b_up, activation, down projection, + b_down; the projections go
        through `project`. Computes in the compute dtype (autocast's, else x's).

        Args:
            x_RD: rows grouped by expert; groups: where each expert's rows are.
        Returns:
            y_RD: (R, D); padding rows unspecified (as forward).
        """
        dtype = _compute_dtype(x_RD)
        x_RD = x_RD.to(dtype)
        h_RH = self.project(x_RD, "up", groups)
        if self.b_up is not None:
            rows_R = groups.row_experts(x_RD.shape[0])
            h_RH = h_RH + self.b_up.to(dtype).index_select(0, rows_R)
        y_RD = self.project(self.activation(h_RH), "down", groups)
        if self.b_down is not None:
            y_RD = y_RD + self.b_down.to(dtype).index_select(0, rows_R)
        return y_RD

    def project(self, a_RK: Tensor, projection: str, groups: ExpertGroups) -> Tensor:
        """Seam: one projection's grouped matmul, a_RK @ w_{projection}[e] for each expert's
        rows (no bias), in a_RK's dtype.

        Args:
            a_RK: rows grouped by expert (x_RD for "up", the activations a_RF for "down").
            projection: "up" (w_up, K = D) or "down" (w_down, K = F).
            groups: where each expert's rows are.
        Returns:
            (R, N): H for "up", D for "down".
        """
        return grouped_linear(a_RK, getattr(self, f"w_{projection}"), groups)

    def forward_gathered(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Each token through its own K experts, without sorting or grouping the T*K slots.

        The small-batch path (decoding). Eager: a loop over the distinct experts the slots
        chose (ids read on the host, free on the CPU), each expert's weights used in place.
        Compiled: the chosen experts' weights gathered per slot and one batched matmul per
        projection (no host read, so it stays one graph). Inference only: under autograd the
        gathers' backward would scatter the weight gradients into full-size buffers.

        Args:
            x_TD: tokens; ids_TK: each token's experts; weights_TK: combine weights (0 for
                unused slots, whose expert runs and is multiplied by 0).
        Returns:
            y_TD = sum over k of weights_TK[t, k] * expert ids_TK[t, k] applied to x_TD[t].
        """
        T, K = ids_TK.shape
        if torch.compiler.is_compiling():
            ids_A = ids_TK.flatten()
            x_A1D = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
            h_A1H = torch.bmm(x_A1D, self.w_up.index_select(0, ids_A))
            if self.b_up is not None:
                h_A1H = h_A1H + self.b_up.index_select(0, ids_A).unsqueeze(1).to(h_A1H.dtype)
            a_A1F = self.activation(h_A1H)
            y_AD = torch.bmm(a_A1F, self.w_down.index_select(0, ids_A)).squeeze(1)
            if self.b_down is not None:
                y_AD = y_AD + self.b_down.index_select(0, ids_A).to(y_AD.dtype)
        else:
            slots_of_expert: dict[int, list[int]] = {}
            for slot, expert in enumerate(ids_TK.flatten().tolist()):
                slots_of_expert.setdefault(expert, []).append(slot)
            y_AD = x_TD.new_empty(T * K, self.d_model)
            for expert, slots in slots_of_expert.items():
                slots_R = torch.tensor(slots, device=x_TD.device)
                h_RH = self._up(x_TD.index_select(0, slots_R // K), expert)
                y_AD[slots_R] = self._down(self.activation(h_RH), expert)
        w_T1K = weights_TK.to(y_AD.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, y_AD.view(T, K, -1)).squeeze(1)

    def forward_reference(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """The obviously-correct loop (slow backward); the fast path must equal it."""
        outputs, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            h = self._up(x_RD[start : start + count], e)
            outputs.append(self._down(self.activation(h), e))
            start += count
        return torch.cat(outputs) if outputs else x_RD[:0]

    def _up(self, x_RD: Tensor, expert: int) -> Tensor:
        h_RH = x_RD @ self.w_up[expert]
        # the bias in the product's dtype, as nn.Linear under autocast
        return h_RH if self.b_up is None else h_RH + self.b_up[expert].to(h_RH.dtype)

    def _down(self, a_RF: Tensor, expert: int) -> Tensor:
        y_RD = a_RF @ self.w_down[expert]
        return y_RD if self.b_down is None else y_RD + self.b_down[expert].to(y_RD.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, "
            f"d_hidden={self.d_hidden}, activation={self.activation}, backend={self.backend}"
            + (", bias=True" if self.b_up is not None else "")
        )


class MLP(nn.Module):
    """A dense feed-forward block with the experts' activation (the shared experts)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str | Activation = "swiglu"):
        super().__init__()
        self.activation = resolve_activation(activation)
        self.up = nn.Linear(d_model, d_hidden * (2 if self.activation.gated else 1), bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.activation(self.up(x)))


class ModuleExperts(nn.Module):
    """Heterogeneous experts: any nn.Module per expert (the classic 1991 mixture).

    Slower than GroupedExperts (a Python loop), but each expert may differ in width or kind.
    """

    plain_weights: ClassVar[bool] = False  # no 3-D weights (GroupedExperts.plain_weights)

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
