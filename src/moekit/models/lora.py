"""LoRA adapters (Hu et al. 2021) on the attention projections, the routed experts, the shared
experts and the router of a Transformer, and their merge into the weights.

Attention adapters go on every linear projection of the layer's kind (ATTENTION_PROJECTIONS):
q, k, v, o for grouped-query attention and gpt-oss's sink attention (their biases stay
frozen base weights), and for multi-head latent attention the query projection (wq, or
wq_down and wq_up), the joint key/value down-projection wkv_down, the up-projection wkv_up
and wo.

# R routed rows (grouped by expert), D model, F expert hidden, H = 2F for GLU experts (else F),
# E experts, r rank, s = alpha / r

A linear map W x becomes W x + s * B (A dropout(x)). B starts at zero (A as nn.Linear
initialises its weight), so an adapted model starts equal to its base.

Routed experts keep their 3-D weights and get per-expert factors:
    h_RH = x_RD @ w_up[e]   + s * (dropout(x_RD) @ lora_A_up[e])   @ lora_B_up[e]
    y_RD = a_RF @ w_down[e] + s * (dropout(a_RF) @ lora_A_down[e]) @ lora_B_down[e]
with lora_A_up (E, D, r), lora_B_up (E, r, H), lora_A_down (E, F, r), lora_B_down (E, r, D).
Experts with biases (gpt-oss) add b_up[e] to h_RH and b_down[e] to y_RD: the biases stay
frozen base weights, the low-rank deltas add to the weight products only. Every product is one grouped GEMM over the same expert offsets as the weights (no loop
over experts); a frozen weight gets no gradient. The router's adapter is a low-rank delta
on its (E, D) gate weight with no dropout (as PEFT's adapters on parameters have none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..experts import ExpertGroups, GroupedExperts, grouped_linear
from ..moe import MoE
from .attention import Attention
from .mla import MultiHeadLatentAttention
from .transformer import Transformer

LORA_TARGETS = ("attention", "experts", "shared", "router")
# The linear projections that get adapters, per attention kind (ModelConfig.attention); MLA
# has wq, or wq_down and wq_up (a compressed query), never both.
ATTENTION_PROJECTIONS = {
    "gqa": ("wq", "wk", "wv", "wo"),
    "sinks": ("wq", "wk", "wv", "wo"),
    "mla": ("wq", "wq_down", "wq_up", "wkv_down", "wkv_up", "wo"),
}


@dataclass(kw_only=True)
class LoRAConfig:
    """Which weights get adapters, and their rank, scale and dropout.

    rank 0 means no adapters (full fine-tuning). targets: comma-separated from
    attention (the attention's projections, ATTENTION_PROJECTIONS), experts (the routed experts' 3-D weights), shared
    (the shared experts) and router. alpha / rank scales the update (PEFT's lora_alpha).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention,experts"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"lora.rank ({self.rank!r}) must be an integer >= 0")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha ({self.alpha}) must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout ({self.dropout}) must be in [0, 1)")
        unknown = [t for t in self.target_list if t not in LORA_TARGETS]
        if unknown or not self.target_list:
            raise ValueError(
                f"lora.targets ({self.targets!r}): choose from {', '.join(LORA_TARGETS)}"
            )

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _init_down(rank: int, fan_in: int, *leading: int) -> Tensor:
    """lora_A's initialisation: nn.Linear's default (kaiming uniform, a = sqrt(5))."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(*leading, rank, fan_in).uniform_(-bound, bound)


class LoRALinear(nn.Module):
    """An nn.Linear's weight and bias plus lora_A (r, in) and lora_B (out, r), as PEFT's."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(_init_down(config.rank, self.in_features).to(device, dtype))
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, config.rank))

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def delta_weight(self) -> Tensor:
        """s * B @ A, (out, in): what merging adds to the weight."""
        return self.scaling * (self.lora_B @ self.lora_A)


class LoRAGroupedExperts(GroupedExperts):
    """GroupedExperts (same w_up, w_down) with per-expert low-rank adapters on both.

    Overrides GroupedExperts' seams: `project` adds the low-rank update to each projection,
    `gemm_widths` adds the rank; the rows run through GroupedExperts.run_experts.
    """

    fused: ClassVar[bool] = False  # the adapters' GEMMs are autograd nodes of their own
    plain_weights: ClassVar[bool] = False  # w_up, w_down alone are not the function

    def __init__(self, base: GroupedExperts, config: LoRAConfig):
        nn.Module.__init__(self)
        E, D, Fh = base.num_experts, base.d_model, base.d_hidden
        self.num_experts, self.d_model, self.d_hidden = E, D, Fh
        self.activation, self.backend = base.activation, base.backend
        self.w_up, self.w_down = base.w_up, base.w_down
        self.b_up, self.b_down = base.b_up, base.b_down  # frozen; None without expert_bias
        self.rank, self.scaling = config.rank, config.scaling
        self.dropout = nn.Dropout(config.dropout)
        H, like = self.w_up.shape[-1], self.w_up
        # A as (E, in, r) and B as (E, r, out): the layout grouped_mm multiplies rows by.
        self.lora_A_up = nn.Parameter(
            _init_down(self.rank, D, E).transpose(1, 2).contiguous().to(like)
        )
        self.lora_B_up = nn.Parameter(like.new_zeros(E, self.rank, H))
        self.lora_A_down = nn.Parameter(
            _init_down(self.rank, Fh, E).transpose(1, 2).contiguous().to(like)
        )
        self.lora_B_down = nn.Parameter(like.new_zeros(E, self.rank, D))

    def gemm_widths(self) -> tuple[int, ...]:
        return (*super().gemm_widths(), self.rank)

    def project(self, a_RK: Tensor, projection: str, groups: ExpertGroups) -> Tensor:
        """a_RK @ w[e] + s * (dropout(a_RK) @ lora_A[e]) @ lora_B[e], each a grouped GEMM."""
        lora_A = getattr(self, f"lora_A_{projection}")
        lora_B = getattr(self, f"lora_B_{projection}")
        update = grouped_linear(grouped_linear(self.dropout(a_RK), lora_A, groups), lora_B, groups)
        return super().project(a_RK, projection, groups) + self.scaling * update

    def merged_weights(self) -> tuple[Tensor, Tensor]:
        """w_up + s * A_up @ B_up and w_down + s * A_down @ B_down, per expert."""
        w_up = self.w_up + self.scaling * torch.bmm(self.lora_A_up, self.lora_B_up)
        w_down = self.w_down + self.scaling * torch.bmm(self.lora_A_down, self.lora_B_down)
        return w_up.detach(), w_down.detach()

    def forward_reference(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """The loop over experts with the merged weights: the oracle of forward (no dropout)."""
        w_up, w_down = self.merged_weights()
        outputs, start = [], 0
        for e, count in enumerate(counts_E.tolist()):
            h = x_RD[start : start + count] @ w_up[e]
            h = h if self.b_up is None else h + self.b_up[e]
            y = self.activation(h) @ w_down[e]
            outputs.append(y if self.b_down is None else y + self.b_down[e])
            start += count
        return torch.cat(outputs) if outputs else x_RD[:0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_rank={self.rank}"


class LoRAWeightDelta(nn.Module):
    """A parametrization W -> W + s * lora_B @ lora_A, for a weight read directly (the router)."""

    def __init__(self, weight: Tensor, config: LoRAConfig):
        super().__init__()
        out_features, in_features = weight.shape
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(_init_down(config.rank, in_features).to(weight))
        self.lora_B = nn.Parameter(weight.new_zeros(out_features, config.rank))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)


def add_lora(model: Transformer, config: LoRAConfig) -> Transformer:
    """Put adapters on config.targets of model's decoder layers (in place) and freeze every
    other parameter.

    Returns:
        The model; only its lora_* parameters require gradients.
    Raises:
        ValueError: a target the model does not have (experts in a dense model, say), an
            attention kind without adapters, or attention or MoE layers outside the decoder
            layers (which no adapter covers), named.
    """
    if config.rank == 0:
        raise ValueError("lora.rank is 0: no adapters to add")
    targets = config.target_list
    moe_layers = [m for m in model.layers.modules() if isinstance(m, MoE)]
    if not moe_layers and set(targets) & {"experts", "shared", "router"}:
        raise ValueError(f"lora.targets ({config.targets!r}) name MoE parts; the model is dense")
    if "shared" in targets and not any(m.shared is not None for m in moe_layers):
        raise ValueError("lora.targets names shared experts; the model has none")
    kind = model.config.attention
    if "attention" in targets and kind not in ATTENTION_PROJECTIONS:
        raise ValueError(
            f"lora.targets names attention; adapters exist for "
            f"{', '.join(ATTENTION_PROJECTIONS)} attention, the model's is {kind!r} "
            "(leave attention out of lora.targets)"
        )
    _refuse_outside_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.layers.modules()):
        if isinstance(module, Attention | MultiHeadLatentAttention) and "attention" in targets:
            for name in ATTENTION_PROJECTIONS[kind]:
                if hasattr(module, name):
                    setattr(module, name, LoRALinear(getattr(module, name), config))
        if isinstance(module, MoE):
            if "experts" in targets:
                module.experts = LoRAGroupedExperts(module.experts, config)
            if "shared" in targets and module.shared is not None:
                module.shared.up = LoRALinear(module.shared.up, config)
                module.shared.down = LoRALinear(module.shared.down, config)
            if "router" in targets:
                delta = LoRAWeightDelta(module.router.weight, config)
                parametrize.register_parametrization(module.router, "weight", delta)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


def _refuse_outside_layers(model: Transformer) -> None:
    """Adapters cover the decoder layers (model.layers) only: refuse a model with attention or
    MoE layers elsewhere (a multi-token-prediction module, say), naming them."""
    elsewhere = [
        name
        for name, module in model.named_modules()
        if isinstance(module, Attention | MultiHeadLatentAttention | MoE)
        and name.split(".")[0] != "layers"
    ]
    if elsewhere:
        raise ValueError(
            f"LoRA adapters cover the decoder layers only; the model also has "
            f"{', '.join(elsewhere)} (fine-tune it without adapters: lora.rank 0)"
        )


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor."""
    return ".lora_" in name or name.startswith("lora_")


def merge_lora(model: Transformer) -> Transformer:
    """A plain Transformer (no adapters) whose weights hold the adapters' updates: it computes
    what model computes (model itself is unchanged)."""
    return _plain_copy(model, fold=True)


def remove_lora(model: Transformer) -> Transformer:
    """A plain Transformer with model's base weights: the adapters dropped (model unchanged)."""
    return _plain_copy(model, fold=False)


def _plain_copy(model: Transformer, fold: bool) -> Transformer:
    plain = Transformer(model.config)
    plain.load_state_dict(plain_state_dict(model, fold), strict=True)
    return plain.train(model.training)


@torch.no_grad()
def plain_state_dict(model: Transformer, fold: bool = True) -> dict[str, Tensor]:
    """model's state_dict under the plain model's names, adapters folded in (or dropped)."""
    state = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    for prefix, module in model.named_modules():
        if isinstance(module, LoRALinear) and fold:
            state[f"{prefix}.weight"] = module.weight + module.delta_weight()
        elif isinstance(module, LoRAGroupedExperts) and fold:
            state[f"{prefix}.w_up"], state[f"{prefix}.w_down"] = module.merged_weights()
        elif parametrize.is_parametrized(module, "weight"):  # the router's delta
            original = state.pop(f"{prefix}.parametrizations.weight.original")
            state[f"{prefix}.weight"] = module.weight if fold else original
    return {name: t.detach() for name, t in state.items()}


def lora_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The adapters alone, by moekit parameter name (detached CPU copies)."""
    return {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if is_adapter(name)
    }
