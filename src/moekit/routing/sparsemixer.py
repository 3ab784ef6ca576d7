"""SparseMixer routing (Liu et al. 2024, "GRIN: GRadient-INformed MoE", arXiv:2409.12136),
the router of Phi-3.5-MoE.

# T tokens, D model, E experts, K top_k

A token picks its experts one at a time. Stage k looks at the experts the earlier stages
left free, keeps those whose logit is within the jitter threshold of the best free one,

    keep e  iff  (max - s_e) / max(|s_e|, max) <= 2 * eps        (eps = MoEConfig.jitter_eps)

and picks one of the kept experts: the best in evaluation, a Gumbel-max sample of the
softmax over the kept logits in training. Its weight is its probability in that masked
softmax (not renormalised across the stages). Phi-3.5-MoE has top_k = 2; a larger top_k
repeats the same stage with every earlier pick removed.

Training (GRIN section 3, Heun's third-order / midpoint estimator): the weight's value is
the masked probability m times a factor, 1 when the sampled expert is the stage's best or
with probability 1/4, else 0.3333 (the reference's rounding of 1/3); its gradient to the
logits is g * m * (onehot(picked) - masked_softmax), the factor left out, as
transformers' PhimoeMultiplier.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MoEConfig
from .base import Router, TokenChoice

# Phi-3.5-MoE's midpoint factor: 1 -> 1.0, 0 -> 0.3333 ((x + 0.5) / 1.5, rounded).
_THIRD = 0.3333


def masked_logits(logits_TE: Tensor, free_TE: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One stage's logits: -inf outside the free experts within the jitter threshold.

    Args:
        logits_TE: fp32 router logits (T, E).
        free_TE: bool (T, E), the experts no earlier stage picked.
        eps: the jitter threshold (GRIN's r = 2 * eps relative gap).

    Returns:
        masked_TE (T, E), and best_T1 (long, (T, 1)): the best free expert.
    """
    with torch.no_grad():
        top_T1, best_T1 = logits_TE.masked_fill(~free_TE, float("-inf")).max(dim=-1, keepdim=True)
        # Relative gap to the best free logit; the earlier picks (gap < 0) stay masked by
        # free_TE. 0 / 0 (every logit 0) is NaN, which compares False: the expert is kept.
        scale_TE = logits_TE.abs().clamp(min=top_T1)
        far_TE = (top_T1 - logits_TE) / scale_TE > 2 * eps
    return logits_TE.masked_fill(far_TE | ~free_TE, float("-inf")), best_T1


class MidpointWeight(torch.autograd.Function):
    """GRIN's weight of a sampled expert: value m * factor, gradient m * (onehot - p)."""

    @staticmethod
    def forward(
        ctx, logits_TE: Tensor, probs_TE: Tensor, id_T1: Tensor, factor_T1: Tensor
    ) -> Tensor:
        """probs_TE: the stage's masked softmax (detached); id_T1 the sampled expert."""
        prob_T1 = probs_TE.gather(1, id_T1)
        ctx.save_for_backward(probs_TE, id_T1, prob_T1)
        return prob_T1 * factor_T1

    @staticmethod
    def backward(ctx, grad_T1: Tensor) -> tuple[Tensor, None, None, None]:
        probs_TE, id_T1, prob_T1 = ctx.saved_tensors
        grad_T1 = grad_T1 * prob_T1
        grad_TE = (probs_TE * -grad_T1).scatter_add(1, id_T1, grad_T1)
        return grad_TE, None, None, None


class SparseMixer(Router):
    """GRIN / Phi-3.5-MoE: stage-wise masked softmax, Gumbel-max sampling in training.

    Weights are each stage's masked probability (config.renormalize does not apply). The
    Switch balance loss and the z-loss use softmax(logits) and the raw logits, as for the
    softmax routers. Training draws from torch's global generator, once per forward: a
    float32 (T, K, E) Exponential(1) tensor (Gumbel noise -log of it), then a float32
    (T, K) uniform tensor (the midpoint coin); torch.manual_seed makes it reproducible.
    """

    renormalizes: ClassVar[bool] = False
    splits_exactly: ClassVar[bool] = False  # a split expert changes the threshold masks

    @classmethod
    def check(cls, config: MoEConfig) -> None:
        if config.jitter_eps == 0:
            raise ValueError(
                f"the sparsemixer router needs jitter_eps > 0, got jitter_eps ({config.jitter_eps}):"
                " its mask keeps the experts within 2 * jitter_eps of the best, so 0 keeps the"
                " best alone, at weight 1, and the router gets no gradient"
            )
        super().check(config)

    @classmethod
    def weights_not_summing_to_one(cls, config: MoEConfig) -> str | None:
        return "sparsemixer weights each expert by its own stage's masked softmax probability"

    def forward(self, x_TD: Tensor) -> TokenChoice:
        logits_TE = self.logits(x_TD)
        T, E, K = logits_TE.shape[0], self.num_experts, self.top_k
        eps = self.config.jitter_eps
        if self.training:
            # 1. the draws, up front (their order is documented in the class docstring)
            gumbel_TKE = -torch.empty(T, K, E, device=logits_TE.device).exponential_().log()
            coin_TK = torch.rand(T, K, device=logits_TE.device)
        free_TE = torch.ones_like(logits_TE, dtype=torch.bool)
        weights, ids = [], []
        for k in range(K):
            # 2. stage k: mask, pick, weigh; then take the pick out of the free experts
            masked_TE, best_T1 = masked_logits(logits_TE, free_TE, eps)
            probs_TE = masked_TE.softmax(dim=-1)
            if self.training:
                noisy_TE = torch.where(masked_TE.isinf(), masked_TE, masked_TE + gumbel_TKE[:, k])
                id_T1 = noisy_TE.detach().argmax(dim=-1, keepdim=True)
                is_best_T1 = id_T1 == probs_TE.detach().max(dim=-1, keepdim=True).indices
                factor_T1 = torch.where(is_best_T1 | (coin_TK[:, k : k + 1] > 0.75), 1.0, _THIRD)
                weight_T1 = MidpointWeight.apply(logits_TE, probs_TE.detach(), id_T1, factor_T1)
            else:
                id_T1 = best_T1
                weight_T1 = probs_TE.gather(1, id_T1)
            weights.append(weight_T1)
            ids.append(id_T1)
            free_TE = free_TE & ~F.one_hot(id_T1.squeeze(1), E).bool()
        weights_TK, ids_TK = torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)

        # 3. the distribution for the losses and capacity (its ranking is the logits')
        full_TE = logits_TE.softmax(dim=-1)
        rank_TE = full_TE
        if self.training:
            # Sampled picks need not be the best: lift them, in order, above every other
            # expert, so capacity rerouting walks on from them (its "own picks first").
            lift_TK = torch.arange(K + 1, 1, -1, device=x_TD.device, dtype=full_TE.dtype)
            rank_TE = full_TE.detach().scatter(1, ids_TK, lift_TK.expand(T, K))
        return TokenChoice(
            weights_TK=weights_TK,
            ids_TK=ids_TK,
            valid_TK=None,
            gate_TE=full_TE,
            rank_TE=rank_TE,
            logits_TE=logits_TE,
            probs_TE=full_TE,
        )

    def replay_weights(self, decision, ids_TK: Tensor, valid_TK: Tensor | None) -> Tensor:
        """The evaluation weights of ids_TK (factor 1): stage k's masked probability of
        ids_TK[:, k] with ids_TK[:, :k] taken out."""
        logits_TE = decision.logits_TE
        free_TE = torch.ones_like(logits_TE, dtype=torch.bool)
        weights = []
        for k in range(ids_TK.shape[1]):
            id_T1 = ids_TK[:, k : k + 1]
            masked_TE, _ = masked_logits(logits_TE, free_TE, self.config.jitter_eps)
            weights.append(masked_TE.softmax(dim=-1).gather(1, id_T1))
            free_TE = free_TE & ~F.one_hot(id_T1.squeeze(1), logits_TE.shape[-1]).bool()
        weights_TK = torch.cat(weights, dim=-1)
        return weights_TK if valid_TK is None else weights_TK * valid_TK
