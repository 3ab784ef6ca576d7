"""Multi-gate mixture of experts (Ma et al. 2018, "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts") and its shared-bottom baseline.

# B examples, D input features, F expert hidden, E experts, T tasks

MMoE: experts f_e are shared by all tasks; task t has its own softmax gate g_t and tower
h_t:  y_t = h_t(sum_e g_t(x)_e f_e(x))  (paper eq. 5-6). The experts run once per batch
and every gate mixes the same outputs. Shared-bottom (Caruana 1997): y_t = h_t(f(x)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import MLP, GroupedExperts
from ..routing import build_router
from .classic import GateChoice, TaskOutput


def tower(d_in: int, hidden: int) -> nn.Sequential:
    """A task's tower: D -> hidden -> 1 with a ReLU (the paper's towers are small MLPs)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class MMoE(nn.Module):
    """Shared experts, one dense softmax gate and one tower per task.

    Args:
        in_features: D (gates and experts see the raw input).
        num_tasks: T.
        num_experts, expert_hidden: E and F of the shared ReLU experts (D -> F -> D).
        tower_hidden: hidden width of each task's tower.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int = 2,
        *,
        num_experts: int = 8,
        expert_hidden: int = 16,
        tower_hidden: int = 8,
    ):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks ({num_tasks}) must be >= 1")
        self.num_experts = num_experts
        gate_config = MoEConfig(
            d_model=in_features, d_hidden=expert_hidden, num_experts=num_experts, router="dense"
        )
        self.experts = GroupedExperts(num_experts, in_features, expert_hidden, activation="relu")
        self.gates = nn.ModuleList(build_router(gate_config) for _ in range(num_tasks))
        self.towers = nn.ModuleList(tower(in_features, tower_hidden) for _ in range(num_tasks))

    def forward(self, x_BD: Tensor) -> TaskOutput:
        B, D = x_BD.shape
        E = self.num_experts
        # Every expert on every example: E groups of the same B rows.
        counts_E = torch.full((E,), B, dtype=torch.long, device=x_BD.device)
        y_EBD = self.experts(x_BD.repeat(E, 1), counts_E).view(E, B, D)
        outputs = []
        for gate, head in zip(self.gates, self.towers):
            weights_BE = gate(x_BD).probs_TE.to(y_EBD.dtype)  # the dense gate's softmax
            outputs.append(head(torch.einsum("be,ebd->bd", weights_BE, y_EBD)))
        prediction = torch.cat(outputs, dim=-1)
        return TaskOutput(prediction, prediction.new_zeros(()), [])

    @torch.no_grad()
    def gate_choices(self, x_BD: Tensor) -> dict[str, GateChoice]:
        """Per task ("task1", ...), the expert its gate weights most for each example."""
        return {
            f"task{t + 1}": GateChoice(gate(x_BD).probs_TE.argmax(dim=-1), self.num_experts)
            for t, gate in enumerate(self.gates)
        }


class SharedBottom(nn.Module):
    """One shared ReLU network (D -> hidden -> D, as one MMoE expert) and a tower per task.

    Args:
        in_features, num_tasks, tower_hidden: as MMoE.
        bottom_hidden: hidden width of the shared network.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int = 2,
        *,
        bottom_hidden: int = 136,
        tower_hidden: int = 8,
    ):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks ({num_tasks}) must be >= 1")
        self.bottom = MLP(in_features, bottom_hidden, activation="relu")
        self.towers = nn.ModuleList(tower(in_features, tower_hidden) for _ in range(num_tasks))

    def forward(self, x_BD: Tensor) -> TaskOutput:
        shared_BD = self.bottom(x_BD)
        prediction = torch.cat([head(shared_BD) for head in self.towers], dim=-1)
        return TaskOutput(prediction, prediction.new_zeros(()), [])

    def gate_choices(self, x_BD: Tensor) -> dict[str, GateChoice]:
        return {}
