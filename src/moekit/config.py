"""Configuration of an MoE layer: one kw-only dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .activations import ACTIVATION_CLASSES

ROUTERS = (
    "softmax_topk",
    "noisy_topk",
    "switch",
    "gshard",
    "sigmoid_topk",
    "top_p",
    "expert_choice",
    "soft",
    "dense",
    "sparsemixer",
)
# The activations' names (activations.ACTIVATION_CLASSES: each says whether it is gated).
ACTIVATIONS = tuple(ACTIVATION_CLASSES)
OVERFLOW_POLICIES = ("drop", "reroute")
# Over which tokens the balancing losses count the experts' load (MoEConfig.balance_scope).
BALANCE_SCOPES = ("micro_batch", "sequence", "global")
# How the routed experts run: torch's grouped_mm where supported (auto), or one torch.mm
# per expert (loop, which reads the counts on the host). See experts.choose_backend.
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
# Each router's class by name: its traits and the rules of its settings (routing/base.py,
# RouterRules). routing/ sits above this module, so it registers them here when imported
# (moekit's __init__ imports it); this module names no router.
_ROUTER_RULES: dict[str, Any] = {}

_warned: set[str] = set()


def register_routers(classes: Mapping[str, Any]) -> None:
    """Make the router classes (routing.ROUTER_CLASSES) the rules MoEConfig checks."""
    _ROUTER_RULES.update(classes)


def warn_once(message: str) -> None:
    """Emit a UserWarning the first time a given message is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(kw_only=True)
class MoEConfig:
    """Everything that defines one MoE layer.

    Shapes: d_model (D) is the token width, d_hidden (F) the hidden width of each routed
    expert, num_experts (E) the number of routed experts, top_k (K) the experts per token.
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    router: str = "softmax_topk"
    activation: str = "swiglu"
    # swiglu_clamped (gpt-oss): gate clamped to <= limit, up to [-limit, limit], then
    # (up + 1) * gate * sigmoid(alpha * gate); see activations.ClampedSwiGLU.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False  # biases on both expert projections (gpt-oss)
    expert_backend: str = "auto"  # "auto", "grouped_mm" or "loop"; see EXPERT_BACKENDS

    # Capacity: C = ceil(capacity_factor * T * top_k / E); None = dropless.
    capacity_factor: float | None = None
    overflow: str = "drop"  # "drop" or "reroute" (to the next-ranked expert with room)
    batch_priority: bool = False  # V-MoE: highest router score claims capacity first

    # Router options (each is used by the routers named in its comment).
    router_bias: bool = False  # every router but soft: a learned bias on the logits (gpt-oss)
    renormalize: bool = True  # softmax_topk, noisy_topk, sigmoid_topk, top_p: weights sum to 1
    # switch: input *= U(1 - eps, 1 + eps) in training; sparsemixer: an expert is masked
    # when its logit is more than 2 * eps (relative) below the best (Phi-3.5: 0.01)
    jitter_eps: float = 0.01
    top_p: float = 0.5  # top_p: smallest expert set whose probabilities reach p (max top_k)
    num_groups: int = 1  # sigmoid_topk, softmax_topk: experts split into groups (n_group)
    topk_groups: int = 1  # sigmoid_topk, softmax_topk: groups each token may use (topk_group)
    routed_scaling: float = 1.0  # sigmoid_topk, softmax_topk: routed output scale (V3: 2.5)
    # softmax_topk: a `bias` buffer (E,) added to the probabilities for selection only
    # (ERNIE 4.5's e_score_correction_bias); not trained by gradient
    selection_bias: bool = False
    bias_update_rate: float = 1e-3  # sigmoid_topk: aux-loss-free balancing step size
    slots_per_expert: int = 1  # soft: slots each expert processes per sequence

    # Shared (always-on) experts, DeepSeekMoE / Qwen-MoE. Hidden width per shared expert
    # defaults to d_hidden; they run as one dense MLP of width num_shared * d_shared_hidden.
    num_shared_experts: int = 0
    d_shared_hidden: int | None = None
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared output

    # Loss coefficients: out.aux_loss = sum(coef * unweighted part).
    balance_loss_coef: float = 0.01  # Switch eq. (4): N * sum_i f_i * P_i
    z_loss_coef: float = 0.0  # ST-MoE eq. (5): mean logsumexp(logits)^2
    importance_loss_coef: float = 0.0  # Shazeer 2017: CV^2 of importance
    load_loss_coef: float = 0.0  # Shazeer 2017: CV^2 of (smooth, for noisy_topk) load
    # The tokens the balance, importance and load losses are computed over (losses.py,
    # "Scopes"): "micro_batch" (each forward's own tokens: Switch, GShard), "sequence"
    # (each sequence alone, then averaged: DeepSeek-V3's sequence-wise loss), "global"
    # (every token of the optimizer step, across micro-batches and data-parallel ranks,
    # exactly: the trainer counts the step's routing first; train/accumulation.py).
    balance_scope: str = "micro_batch"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not (self.swiglu_alpha > 0 and self.swiglu_limit > 0):
            raise ValueError(
                f"swiglu_alpha ({self.swiglu_alpha}) and swiglu_limit ({self.swiglu_limit}) "
                "must be > 0"
            )
        rules = self.router_rules
        fixed_top_k = rules.fixed_top_k(self)
        if fixed_top_k is not None:
            self.top_k = fixed_top_k
        rules.check(self)  # the router's own rules (switch is top-1, ...)
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k ({self.top_k!r}) must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor ({self.capacity_factor}) must be > 0 or None")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(
                f"unknown expert_backend {self.expert_backend!r}; choose one of "
                f"{', '.join(EXPERT_BACKENDS)}"
            )
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"unknown overflow policy {self.overflow!r}; choose one of "
                f"{', '.join(OVERFLOW_POLICIES)}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"jitter_eps ({self.jitter_eps}) must be in [0, 1)")
        if self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert ({self.slots_per_expert}) must be >= 1")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts ({self.num_shared_experts}) must be >= 0")
        if self.d_shared_hidden is not None and self.d_shared_hidden < 1:
            raise ValueError(f"d_shared_hidden ({self.d_shared_hidden}) must be >= 1")
        for name in ("balance_loss_coef", "z_loss_coef", "importance_loss_coef", "load_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(
                f"unknown balance_scope {self.balance_scope!r}; choose one of "
                f"{', '.join(BALANCE_SCOPES)}"
            )
        self._check_groups()
        self._warn_settings_without_effect()

    def _check_groups(self) -> None:
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups ({self.num_groups}) must divide num_experts ({self.num_experts})"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) must be in [1, num_groups ({self.num_groups})]"
            )
        # Only group-limited routers limit a token to its groups; others just warn (below).
        experts_reachable = self.topk_groups * (self.num_experts // self.num_groups)
        if self.router_rules.group_limited and self.top_k > experts_reachable:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts in topk_groups ({self.topk_groups}) "
                f"groups of {self.num_experts // self.num_groups}"
            )

    def _warn_settings_without_effect(self) -> None:
        self.router_rules.warn_settings_without_effect(self)
        if self.capacity_factor is None and (self.overflow != "drop" or self.batch_priority):
            warn_once("overflow and batch_priority have no effect when capacity_factor is None")
        clamp_changed = (self.swiglu_alpha, self.swiglu_limit) != (1.702, 7.0)
        if clamp_changed and self.activation != "swiglu_clamped":
            warn_once("swiglu_alpha/swiglu_limit only apply to the swiglu_clamped activation")
        if self.num_shared_experts == 0 and (
            self.shared_expert_gate or self.d_shared_hidden is not None
        ):
            warn_once("shared_expert_gate/d_shared_hidden have no effect without shared experts")

    @property
    def router_rules(self) -> Any:
        """The class of the router named by self.router (routing/base.py, RouterRules)."""
        assert self.router in _ROUTER_RULES, "moekit.routing registers every router on import"
        return _ROUTER_RULES[self.router]

    @property
    def gated(self) -> bool:
        """True for GLU activations, whose up projection has two halves (gate, up)."""
        return ACTIVATION_CLASSES[self.activation].gated

    @property
    def shared_hidden(self) -> int:
        """Total hidden width of the shared experts (0 without them)."""
        return self.num_shared_experts * (self.d_shared_hidden or self.d_hidden)

    def segmented(self, factor: int) -> MoEConfig:
        """Fine-grained expert segmentation (DeepSeekMoE): each expert split into `factor`.

        num_experts and top_k grow by `factor`, d_hidden shrinks by it, so the total and the
        active parameters stay the same while the routing gets finer.
        """
        if factor < 1 or self.d_hidden % factor:
            raise ValueError(
                f"factor ({factor}) must be >= 1 and divide d_hidden ({self.d_hidden})"
            )
        return dataclasses.replace(
            self,
            num_experts=self.num_experts * factor,
            top_k=self.top_k * factor,
            d_hidden=self.d_hidden // factor,
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a batch of num_tokens: ceil(cf * T * top_k / E), None = no limit."""
        factor = self.router_rules.capacity_factor(self)
        if factor is None:
            return None
        if num_tokens == 0:
            return 0
        capacity = max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))
        # An expert can hold at most every token once.
        return min(capacity, num_tokens)
