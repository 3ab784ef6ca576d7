"""DeepSeek-V3's multi-token prediction (MTP), a training objective of the decoder.

# B batch, T tokens per sequence, D model, V vocab

DeepSeek-V3 (arXiv:2412.19437, section 2.2) chains mtp_depth modules (the paper's D; not
the model width here) after the main model. With
h^0_i the main model's last hidden state at position i (before its final norm), module
k = 1..D computes, for the positions i that have a token k + 1 ahead:
    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]          eq. (21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                  eq. (22)
    P^k_{i+k+1} = OutHead(h^k_i)                                       eq. (23)
    L^k_MTP = CE(P^k_{2+k:T+1}, t_{2+k:T+1})                           eq. (24)
    L_MTP = lambda / D * sum_k L^k_MTP                                 eq. (25)
M_k is a (2 d_model -> d_model) projection, TRM_k one transformer block, and the embedding
Emb and the output head are the main model's own (shared, not copied). As in the released
weights (enorm, hnorm, eh_proj, one decoder layer, shared_head.norm, shared_head.head),
each module has its own final RMSNorm before the shared head (OutHead = head(RMSNorm(.))).
Eq. (21) writes h first; the released weights' reference code concatenates the normalised
embedding first, [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], and so does this module, so
that a checkpoint's eh_proj is M_k as stored (the order is a relabelling of M_k's columns).

Shapes stay (B, T, ...) at every depth, which keeps the forward compile-friendly: module k
reads the tokens shifted left by k and the positions within k of the end have no target
(ignored like the -100 targets of the main loss). Position i still attends causally to
positions <= i, whose inputs hold tokens up to t_{i+k}: nothing leaks from its target.

Only forwards with targets and without a KV cache run these modules: logits, generation
and the KV cache are the main model's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe import MoEOutput, MoEStats
from .attention import Placement
from .norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP module: norms and projection M_k (eq. 21), a block (eq. 22), a final norm.

    Args:
        block: the transformer block TRM_k; the decoder passes one of its own kind
            (models/transformer.py builds it like its last layer).
        d_model: D.
        norm_eps: epsilon of the RMSNorms.
    """

    def __init__(self, block: nn.Module, d_model: int, norm_eps: float):
        super().__init__()
        self.embed_norm = RMSNorm(d_model, norm_eps)
        self.hidden_norm = RMSNorm(d_model, norm_eps)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = RMSNorm(d_model, norm_eps)  # before the shared head

    def forward(
        self, h_BTD: Tensor, embedded_BTD: Tensor, where: Placement
    ) -> tuple[Tensor, Tensor, MoEOutput | None]:
        """h^k from h^{k-1} (B, T, D) and Emb(t_{i+k}) (B, T, D).

        Returns:
            h^k (B, T, D) for the next module, RMSNorm(h^k) (B, T, D) for the shared head
            (normalised here, in the module's own forward: under FSDP its weights are
            gathered only then), and the block's MoE output (None for a dense FFN).
        """
        merged_BT2D = torch.cat([self.embed_norm(embedded_BTD), self.hidden_norm(h_BTD)], dim=-1)
        h_BTD, moe_out = self.block(self.proj(merged_BT2D), where, None)
        return h_BTD, self.norm(h_BTD), moe_out


@dataclass
class MTPOutput:
    """loss: lambda / D * sum_k CE_k (eq. 25), a scalar (0 without targets). aux_loss: the
    modules' MoE aux losses, summed. stats: one entry per module (MoEStats or None)."""

    loss: Tensor
    aux_loss: Tensor
    stats: list[MoEStats | None]


def masked_cross_entropy(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Mean CE over the targets that are not -100, in fp32; 0 when there are none."""
    total = F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (targets_BT != -100).sum().clamp(min=1)


def multi_token_prediction(
    modules: nn.ModuleList,
    h_BTD: Tensor,
    tokens_BT: Tensor,
    targets_BT: Tensor,
    where: Placement,
    embed: Callable[[Tensor], Tensor],
    head: Callable[[Tensor], Tensor],
    weight: float,
    attention_mask_BT: Tensor | None = None,
) -> MTPOutput:
    """Run the D modules after the main model and return the MTP loss (eqs. 21-25).

    Args:
        modules: the D MTPModules, in order.
        h_BTD: h^0, the main model's last hidden state (before its final norm).
        tokens_BT: the input tokens t_i; targets_BT: the next tokens t_{i+1} (-100 = ignore).
        where: the main forward's positions and mask (the modules see the same sequence).
        embed, head: the main model's embedding and output head (shared; Transformer.embed
            and Transformer.head, with the decoder's multipliers and logits scaling).
        weight: lambda.
        attention_mask_BT: the main forward's (1 real, 0 padding) or None. A padding
            position predicts nothing, even where the token k + 1 ahead is real (left
            padding: the targets -100 of the main loss sit at the padding, not k ahead).
    """
    loss = h_BTD.new_zeros((), dtype=torch.float32)
    aux_loss = h_BTD.new_zeros((), dtype=torch.float32)
    stats: list[MoEStats | None] = []
    for k, module in enumerate(modules, start=1):
        # t_{i+k} is the input token k to the right; t_{i+k+1} the target k to the right.
        # The last k positions have neither: embed token 0 there and ignore its target.
        next_BT = F.pad(tokens_BT[:, k:], (0, k))
        target_BT = F.pad(targets_BT[:, k:], (0, k), value=-100)
        if attention_mask_BT is not None:
            target_BT = target_BT.masked_fill(attention_mask_BT == 0, -100)
        h_BTD, normed_BTD, moe_out = module(h_BTD, embed(next_BT), where)
        loss = loss + masked_cross_entropy(head(normed_BTD), target_BT)
        if moe_out is not None:
            aux_loss = aux_loss + moe_out.aux_loss
        stats.append(None if moe_out is None else moe_out.stats)
    return MTPOutput(loss=loss * (weight / max(len(modules), 1)), aux_loss=aux_loss, stats=stats)
