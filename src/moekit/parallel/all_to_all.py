"""All-to-all expert dispatch: each rank runs E / ep experts on the rows every rank sends.

# R routed rows, D model, E experts, L = E / ep local experts, S source ranks (ep)

The layer's local plan still groups this rank's rows by (global) expert; the experts
module below is where the rows travel:
    1. exchange counts: send_SL[dst, l] rows go to rank dst's local expert l (equal splits)
    2. all_to_all_single the rows with variable splits; they arrive source-major [src][l]
    3. regroup them expert-major [l][src] and run the L local experts as one grouped MLP
    4. undo the regrouping, all_to_all back: y_RD comes home in the plan's row order
The backward of each exchange is the exchange with the splits swapped, so every rank
takes part in both directions even with zero rows (no rank waits on a missing peer).
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..experts import GroupedExperts


class ExchangeClock:
    """Wall seconds this layer spent in all-to-all exchanges (forward and backward) since
    the last read: the communication side of the run log's compute/communication split.
    The exchanges are synchronous here (gloo), so their wall time is their cost."""

    def __init__(self):
        self.seconds = 0.0

    def read_and_reset(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _exchange(
    x_RD: Tensor, send_sizes: list[int], recv_sizes: list[int], group, clock: ExchangeClock
) -> Tensor:
    start = time.perf_counter()
    out = x_RD.new_empty(sum(recv_sizes), *x_RD.shape[1:])
    dist.all_to_all_single(
        out,
        x_RD.contiguous(),
        output_split_sizes=recv_sizes,
        input_split_sizes=send_sizes,
        group=group,
    )
    clock.seconds += time.perf_counter() - start
    return out


class _AllToAll(torch.autograd.Function):
    """Rows to their ranks; backward sends the gradients the same way back."""

    @staticmethod
    def forward(ctx, x_RD, send_sizes, recv_sizes, group, clock):
        ctx.sizes, ctx.group, ctx.clock = (send_sizes, recv_sizes), group, clock
        return _exchange(x_RD, send_sizes, recv_sizes, group, clock)

    @staticmethod
    def backward(ctx, grad_RD):
        send_sizes, recv_sizes = ctx.sizes
        grad = _exchange(grad_RD, recv_sizes, send_sizes, ctx.group, ctx.clock)
        return grad, None, None, None, None


class _Permute(torch.autograd.Function):
    """x_RD[order_R]; backward gathers with the inverse permutation (no index_add)."""

    @staticmethod
    def forward(ctx, x_RD, order_R):
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, order_R)

    @staticmethod
    def backward(ctx, grad_RD):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None


def expert_major_order(counts_SL: Tensor) -> Tensor:
    """Row order that turns source-major blocks [s][l] into expert-major blocks [l][s].

    Args:
        counts_SL: rows from source s for local expert l.
    Returns:
        (R,) long: position in the source-major rows of each expert-major row.
    """
    flat = counts_SL.flatten()
    starts_SL = (flat.cumsum(0) - flat).view_as(counts_SL)
    counts_LS, starts_LS = counts_SL.t().flatten(), starts_SL.t().flatten()
    total = int(flat.sum())
    block_start_R = torch.repeat_interleave(starts_LS, counts_LS, output_size=total)
    offset_R = torch.arange(total, device=flat.device) - torch.repeat_interleave(
        counts_LS.cumsum(0) - counts_LS, counts_LS, output_size=total
    )
    return block_start_R + offset_R


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of a GroupedExperts, fed by an all-to-all over the EP group.

    Holds experts [first_expert, first_expert + L) as w_up (L, D, H), w_down (L, F, D); the
    parameter names equal the unsharded module's, so a consolidated state dict is the
    sharded ones concatenated along dim 0 in EP-rank order.

    Args:
        experts: the full module (E experts), whose slice this rank keeps.
        ep_group: the expert-parallel process group; E must divide by its size.
    """

    plain_weights: ClassVar[bool] = False  # a slice of the experts, fed by an all-to-all

    def __init__(self, experts: GroupedExperts, ep_group):
        ep, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if experts.num_experts % ep:
            raise ValueError(
                f"num_experts ({experts.num_experts}) must be divisible by the "
                f"expert-parallel size ({ep})"
            )
        local = experts.num_experts // ep
        with torch.device(experts.w_up.device):  # meta stays meta (parallel/meta.py)
            super().__init__(
                local,
                experts.d_model,
                experts.d_hidden,
                experts.activation,
                backend=experts.backend,
                bias=experts.b_up is not None,
            )
        self.ep_group, self.ep = ep_group, ep
        self.num_global_experts = experts.num_experts
        self.first_expert = ep_rank * local
        self.clock = ExchangeClock()
        with torch.no_grad():
            rows = slice(self.first_expert, self.first_expert + local)
            self.w_up.copy_(experts.w_up[rows])
            self.w_down.copy_(experts.w_down[rows])
            if self.b_up is not None:
                self.b_up.copy_(experts.b_up[rows])
                self.b_down.copy_(experts.b_down[rows])
        self.to(experts.w_up.device)

    def reset_parameters(self) -> None:
        # The slice is copied from the full module in __init__; a fresh init would be lost.
        pass

    @property
    def sharded_names(self) -> tuple[str, ...]:
        """The parameters this rank holds a slice (L, ...) of: the weights, and biases."""
        return ("w_up", "w_down") + (("b_up", "b_down") if self.b_up is not None else ())

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Args: x_RD rows grouped by global expert, counts_E (E,). Returns y_RD alike."""
        # 1. counts: rank dst receives send_SL[dst] (its L local experts' rows from us)
        send_SL = counts_E.view(self.ep, self.num_experts).contiguous()
        recv_SL = torch.empty_like(send_SL)
        dist.all_to_all_single(recv_SL, send_SL, group=self.ep_group)
        send_sizes, recv_sizes = send_SL.sum(1).tolist(), recv_SL.sum(1).tolist()
        # 2. rows out, 3. regroup by local expert and run the experts
        x_in_RD = _AllToAll.apply(
            x_RD[: sum(send_sizes)], send_sizes, recv_sizes, self.ep_group, self.clock
        )
        order_R = expert_major_order(recv_SL)
        y_local_RD = super().forward(_Permute.apply(x_in_RD, order_R), recv_SL.sum(0))
        # 4. back to source-major order, then home
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        y_in_RD = _Permute.apply(y_local_RD, inverse_R)
        y_RD = _AllToAll.apply(y_in_RD, recv_sizes, send_sizes, self.ep_group, self.clock)
        # The plan's padding rows (dropped slots) stay home and are never read: zeros.
        padding = x_RD.shape[0] - y_RD.shape[0]
        return torch.cat([y_RD, y_RD.new_zeros(padding, y_RD.shape[-1])]) if padding else y_RD

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of "
            f"{self.num_global_experts}, ep={self.ep}, d_model={self.d_model}, "
            f"d_hidden={self.d_hidden}, activation={self.activation}"
        )


def exchange_seconds(model: torch.nn.Module) -> float:
    """Seconds every expert-parallel layer of `model` spent in all-to-alls since the last
    call (then reset): 0.0 without expert parallelism."""
    return sum(
        m.clock.read_and_reset() for m in model.modules() if isinstance(m, ExpertParallelExperts)
    )
