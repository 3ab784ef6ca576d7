"""What routers return, and the shared gate every router starts from.

# T tokens, D model, E experts, K top_k, C capacity per expert, S slots per expert
Router math runs in fp32 whatever the input dtype (ST-MoE section 3: bf16 router logits
make the softmax unstable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import MoEConfig, warn_once


@dataclass
class LossParts:
    """The unweighted router losses and the entropy of one routing decision (fp32 scalars).

    routed: assignments the router made before capacity (the dropped fraction's
    denominator), or None where capacity never drops (expert choice, Soft MoE).
    """

    balance: Tensor
    z: Tensor
    importance: Tensor
    load: Tensor
    entropy: Tensor
    routed: Tensor | int | None


def _zero(t: Tensor) -> Tensor:
    return t.new_zeros((), dtype=torch.float32)


@dataclass
class TokenChoice:
    """Each token picks up to K experts.

    weights_TK: combine weights (fp32, differentiable; 0 in unused slots).
    ids_TK: chosen experts (long), best first.
    valid_TK: bool mask of used slots, or None when every slot is used (top_p leaves some
        unused).
    gate_TE: the per-expert gate value the weights are taken from (softmax probability or
        sigmoid score), used to weight an assignment that capacity reroutes.
    rank_TE: the scores experts were ranked by (-inf for experts a token may not use);
        capacity rerouting walks this ranking.
    logits_TE: raw fp32 router logits (z-loss).
    probs_TE: per-token distribution over experts for the balancing losses and entropy.
    load_E: differentiable load estimate (noisy top-k only), else None.
    load_TE: its per-token terms (load_E = load_TE.sum(0)), for the sequence and global
        balance scopes; None with load_E.
    """

    weights_TK: Tensor
    ids_TK: Tensor
    valid_TK: Tensor | None
    gate_TE: Tensor
    rank_TE: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    load_E: Tensor | None = None
    load_TE: Tensor | None = None

    def loss_parts(
        self,
        counts_E: Tensor,
        scope: str = "micro_batch",
        rows: int = 1,
        reference: Tensor | None = None,
    ) -> LossParts:
        """Switch balance, z, importance and load losses; counts_E (after capacity) is the
        load when the router gives no smooth estimate.

        Args:
            scope: the tokens the balance, importance and load losses count over
                (MoEConfig.balance_scope; losses.py, "Scopes").
            rows: the sequences the tokens form (the sequence scope).
            reference: the global scope's (4, E) means of the optimizer step
                (losses.global_means), or None: the micro-batch is the whole step.
        """
        E = self.probs_TE.shape[-1]
        valid = self.valid_TK
        if scope == "sequence":
            balance, importance, load = losses.sequence_balance_losses(
                rows, self.probs_TE, self.weights_TK, self.ids_TK, valid, self.load_TE
            )
        elif scope == "global" and reference is not None:
            balance, importance, load = losses.global_balance_losses(
                reference, self.probs_TE, self.weights_TK, self.ids_TK, self.load_TE
            )
        else:
            load_E = counts_E.float() if self.load_E is None else self.load_E
            balance = losses.switch_balance_loss(self.probs_TE, self.ids_TK, valid)
            importance = losses.importance_loss(self.weights_TK, self.ids_TK, E)
            load = losses.load_loss(load_E)
        return LossParts(
            balance=balance,
            z=losses.router_z_loss(self.logits_TE),
            importance=importance,
            load=load,
            entropy=losses.router_entropy(self.probs_TE.detach()),
            routed=self.ids_TK.numel() if valid is None else valid.sum(),
        )

    def balance_sums(self) -> Tensor:
        """(4, E) detached sums over the tokens for the global scope (losses.balance_sums)."""
        return losses.balance_sums(
            self.probs_TE, self.ids_TK, self.valid_TK, self.weights_TK, self.load_TE
        )

    def expert_ids(self, B: int, T: int) -> Tensor:
        """(B, T, K) experts each token chose, best first; -1 in unused (top_p) slots."""
        ids_TK = self.ids_TK
        if self.valid_TK is not None:
            ids_TK = ids_TK.masked_fill(~self.valid_TK, -1)
        return ids_TK.reshape(B, T, -1)


@dataclass
class ExpertChoice:
    """Each expert picks its top-C tokens (Zhou et al. 2022).

    token_ids_EC: the tokens each expert processes (long), weights_EC their combine weights.
    """

    weights_EC: Tensor
    token_ids_EC: Tensor
    logits_TE: Tensor
    probs_TE: Tensor

    def loss_parts(self, counts_E: Tensor, *scoping) -> LossParts:
        """Only the z-loss applies: every expert takes exactly C tokens (balanced by design)."""
        zero = _zero(self.logits_TE)
        return LossParts(
            balance=zero,
            z=losses.router_z_loss(self.logits_TE),
            importance=zero,
            load=zero,
            entropy=losses.router_entropy(self.probs_TE.detach()),
            routed=None,
        )

    def expert_ids(self, B: int, T: int) -> Tensor:
        """(B, T, E): expert e where e picked the token, else -1 (a token may get 0..E)."""
        E = self.token_ids_EC.shape[0]
        device = self.token_ids_EC.device
        picked_TE = torch.zeros(B * T, E, dtype=torch.bool, device=device)
        picked_TE[self.token_ids_EC, torch.arange(E, device=device).unsqueeze(1)] = True
        expert_TE = torch.arange(E, device=device).expand(B * T, E)
        return torch.where(picked_TE, expert_TE, -1).reshape(B, T, E)


@dataclass
class SoftAssignment:
    """Soft MoE (Puigcerver et al. 2023) for tokens grouped into sequences.

    dispatch_BNS: per slot, a softmax over the N tokens of its sequence (dim 1).
    combine_BNS: per token, a softmax over all E*S slots (dim 2).
    Slot s belongs to expert s // slots_per_expert.
    """

    dispatch_BNS: Tensor
    combine_BNS: Tensor
    logits_BNS: Tensor

    def loss_parts(self, counts_E: Tensor, *scoping) -> LossParts:
        """The z-loss over the slot logits; entropy of each token's combine weights."""
        zero = _zero(self.logits_BNS)
        return LossParts(
            balance=zero,
            z=losses.router_z_loss(self.logits_BNS.flatten(0, 1)),
            importance=zero,
            load=zero,
            entropy=losses.router_entropy(self.combine_BNS.detach().flatten(0, 1)),
            routed=None,
        )

    def expert_ids(self, B: int, T: int) -> None:
        """None: every token mixes every expert's slots, so no token has expert ids."""
        return None


class RouterRules:
    """What a router class is, and the rules of its settings (every router derives from it).

    Class attributes say what a router is, so code outside routing/ never compares names:
        causal: a token's routing depends on that token alone (usable in a decoder).
        uses_capacity: capacity_factor limits the experts (token choice: when set).
        sparse: a token uses a subset of the experts (False: every expert runs for it).
        mixes_tokens: an expert's input mixes several tokens (Soft MoE), so no token has
            expert ids and no example can be routed alone.
        has_selection_bias: a `bias` buffer shifts selection only (DeepSeek-V3).
        optional_selection_bias: MoEConfig.selection_bias adds such a buffer (ERNIE 4.5).
        group_limited: a token picks inside its topk_groups best of num_groups expert
            groups, and the weights are times routed_scaling (DeepSeek-V2/V3).
        smooth_load: the router gives a differentiable load estimate, which the load loss
            trains (noisy top-k); other loads are hard counts.
        renormalizes: with config.renormalize, a token's weights sum to one.
        splits_exactly: an expert split into parts keeps the layer's function (its score
            can be shared by the parts; see moekit.surgery.add_experts).
        balances: the balance, importance and load losses apply (a token-choice decision
            whose load can be uneven), so MoEConfig.balance_scope can choose their tokens.

    MoEConfig.__post_init__ asks the class of config.router (routing registers them with
    config.register_routers): fixed_top_k, check, then warn_settings_without_effect; and
    MoEConfig.capacity asks capacity_factor.
    """

    causal: ClassVar[bool] = True
    uses_capacity: ClassVar[bool] = True
    sparse: ClassVar[bool] = True
    mixes_tokens: ClassVar[bool] = False
    has_selection_bias: ClassVar[bool] = False
    optional_selection_bias: ClassVar[bool] = False
    group_limited: ClassVar[bool] = False
    smooth_load: ClassVar[bool] = False
    renormalizes: ClassVar[bool] = True
    splits_exactly: ClassVar[bool] = True
    balances: ClassVar[bool] = True

    @classmethod
    def fixed_top_k(cls, config: MoEConfig) -> int | None:
        """The top_k this router's definition fixes (set before top_k is checked), or None."""
        return None

    @classmethod
    def check(cls, config: MoEConfig) -> None:
        """ValueError for a setting this router cannot use, naming it (subclasses extend)."""
        if config.selection_bias and not cls.optional_selection_bias:
            raise ValueError(
                f"selection_bias is not supported by the {config.router} router (only by "
                "softmax_topk; sigmoid_topk always has its bias)"
            )

    @classmethod
    def capacity_factor(cls, config: MoEConfig) -> float | None:
        """The capacity factor this router applies (None: no capacity limit)."""
        return config.capacity_factor if cls.uses_capacity else None

    @classmethod
    def warn_settings_without_effect(cls, config: MoEConfig) -> None:
        """Warn once for each setting of config this router ignores."""
        if config.capacity_factor is not None and not cls.uses_capacity:
            warn_once(f"capacity_factor has no effect with the {config.router!r} router")
        if config.num_groups > 1 and not cls.group_limited:
            warn_once(
                "num_groups/topk_groups only apply to the sigmoid_topk and softmax_topk routers"
            )
        if config.routed_scaling != 1.0 and not cls.group_limited:
            warn_once("routed_scaling only applies to the sigmoid_topk and softmax_topk routers")
        if config.load_loss_coef > 0 and not cls.smooth_load:
            warn_once(
                "load_loss_coef: the load of non-noisy routers is a hard count with no "
                "gradient; the load loss only trains the noisy_topk router"
            )


class Router(RouterRules, nn.Module):
    """Linear gate D -> E in fp32; subclasses turn logits into a routing decision.

    What a router is and the rules of its settings: RouterRules.
    """

    @classmethod
    def active_fraction(cls, config: MoEConfig) -> float:
        """Share of the routed experts' weights one token uses, on average: top_k / E (for
        top_p an upper bound: top_k is the most a token may use)."""
        return config.top_k / config.num_experts

    @classmethod
    def weights_not_summing_to_one(cls, config: MoEConfig) -> str | None:
        """Why a token's combine weights may not sum to one under config, or None."""
        if cls.renormalizes and not config.renormalize:
            return f"{config.router} without renormalize scales each token by its top-k weight sum"
        return None

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        # config.router_bias: logits = x W^T + b (gpt-oss), b initialised to zero.
        bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        self.register_parameter("logit_bias", bias)
        self.reset_parameters()

    def route(self, x: Tensor, capacity: int | None) -> TokenChoice | ExpertChoice:
        """The routing decision for the layer input x (..., D), flattened to tokens.

        Every router takes the layer's input and the capacity the same way, so the layer
        and the expert-parallel planner never ask which router they hold.
        """
        return self(x.reshape(-1, x.shape[-1]))

    def reset_parameters(self, std: float | None = None) -> None:
        """Gate weights ~ N(0, std) (default d_model**-0.5); state buffers to zero."""
        std = self.config.d_model**-0.5 if std is None else std
        nn.init.normal_(self.weight, std=std)
        if getattr(self, "logit_bias", None) is not None:
            nn.init.zeros_(self.logit_bias)
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def logits(self, x_TD: Tensor) -> Tensor:
        """fp32 router logits (T, E), outside any autocast region."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bias = None if self.logit_bias is None else self.logit_bias.float()
            return F.linear(x_TD.float(), self.weight.float(), bias)

    def renormalize(self, weights_TK: Tensor) -> Tensor:
        """Scale the chosen weights to sum to 1 per token when configured."""
        if not self.config.renormalize:
            return weights_TK
        return weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def replay_weights(
        self, decision: TokenChoice, ids_TK: Tensor, valid_TK: Tensor | None
    ) -> Tensor:
        """The combine weights this router gives the experts ids_TK (long, (T, K)), taken
        from its own decision's scores, with the same operations as its forward (so the
        router's own ids give its own weights bit for bit, and gradients reach the gate).

        valid_TK: bool mask of used slots, or None. Routers whose weights are not their
        distribution's values at the chosen experts (renormalised when configured)
        override this.
        """
        weights_TK = decision.probs_TE.gather(1, ids_TK)
        if valid_TK is not None:
            weights_TK = weights_TK * valid_TK
        if self.renormalizes:
            weights_TK = self.renormalize(weights_TK)
        return weights_TK
