"""Weight checks: experts and routers that are copies, zero, not finite or mis-scaled.

# E experts, N an expert's weights flattened

A conversion that writes every expert from the same tensor, drops one (zeros), transposes
or rescales one, or writes the same router for every layer still loads and runs; these
checks read the weights alone (docs/doctor.md, "Weights").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..moe import MoE
from .findings import Finding

# Two experts (or router rows) are near copies when ||a - b|| / max(||a||, ||b||) is below
# this. Independent random or trained experts sit near sqrt(2); bf16 rounding of a copy
# gives ~4e-3; experts freshly upcycled from one FFN and trained a little stay above 1e-2.
NEAR_COPY = 1e-2
# An expert tensor whose norm is this many times above or below its siblings' median.
NORM_RATIO = 4.0
_CHUNK = 1 << 22  # elements per expert per Gram chunk (bounds the float64 copy)


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of the model's MoE layers."""
    return [(i, block.ffn) for i, block in enumerate(model.layers) if isinstance(block.ffn, MoE)]


def expert_tensors(moe: MoE) -> dict[str, Tensor]:
    """The experts' per-expert tensors, (E, ...) each: w_up, w_down and biases if any."""
    names = ("w_up", "w_down", "b_up", "b_down")
    return {
        n: getattr(moe.experts, n)
        for n in names
        if isinstance(getattr(moe.experts, n, None), Tensor)
    }


def gram(x_EN: Tensor) -> Tensor:
    """(E, E) float64 inner products of the experts' flattened rows, chunk by chunk."""
    x_EN = x_EN.detach().reshape(x_EN.shape[0], -1)
    g = torch.zeros(x_EN.shape[0], x_EN.shape[0], dtype=torch.float64)
    for chunk in x_EN.split(_CHUNK, dim=1):
        c = chunk.double()
        g += c @ c.T
    return g


def relative_differences(g_EE: Tensor) -> Tensor:
    """(E, E) ||a - b|| / max(||a||, ||b||) from a Gram matrix (0 for two zero rows)."""
    sq = g_EE.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * g_EE).clamp_min(0).sqrt()
    return dist / torch.maximum(sq[:, None], sq[None, :]).sqrt().clamp_min(1e-300)


def check_weights(model: nn.Module) -> list[Finding]:
    """Every weight check on every MoE layer of model, and the routers across layers."""
    findings = []
    layers = moe_layers(model)
    for layer, moe in layers:
        tensors = expert_tensors(moe)
        findings += _nonfinite(layer, tensors, moe.router.weight)
        g = sum(gram(t) for t in tensors.values())
        findings += _zero_experts(layer, tensors)
        findings += _copies(layer, "experts", g, tensors)
        findings += _norm_outliers(layer, tensors)
        router_g = gram(moe.router.weight)
        findings += _zero_rows(layer, moe.router.weight)
        findings += _copies(layer, "router rows", router_g, {"router": moe.router.weight})
    findings += _same_across_layers(layers)
    return findings


def _nonfinite(layer: int, tensors: dict[str, Tensor], router_ED: Tensor) -> list[Finding]:
    bad = {}
    for name, t in (tensors | {"router": router_ED}).items():
        experts = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1).nonzero()
        if len(experts):
            bad[name] = experts.flatten().tolist()
    if not bad:
        return []
    experts = sorted({e for ids in bad.values() for e in ids})
    return [
        Finding(
            "error",
            "weights.nonfinite",
            f"layer {layer}: NaN or infinite weights in expert(s) {experts} ({', '.join(bad)})",
            "the checkpoint is corrupt or was saved after a diverged step: use an earlier one",
            layer=layer,
            experts=experts,
            evidence={"tensors": bad},
        )
    ]


def _zero_experts(layer: int, tensors: dict[str, Tensor]) -> list[Finding]:
    zero = set()
    for name in ("w_up", "w_down"):
        t = tensors[name].detach()
        zero |= set((t.reshape(t.shape[0], -1) == 0).all(1).nonzero().flatten().tolist())
    if not zero:
        return []
    return [
        Finding(
            "error",
            "weights.zero",
            f"layer {layer}: expert(s) {sorted(zero)} have all-zero weights: they output "
            "nothing whatever they are sent",
            "a conversion or merge did not write them: reconvert, and check the source "
            "checkpoint holds these experts",
            layer=layer,
            experts=sorted(zero),
        )
    ]


def _zero_rows(layer: int, router_ED: Tensor) -> list[Finding]:
    zero = (router_ED.detach() == 0).all(1).nonzero().flatten().tolist()
    if not zero:
        return []
    return [
        Finding(
            "error",
            "weights.zero_router",
            f"layer {layer}: router rows {zero} are all zero: those experts get a constant "
            "logit whatever the token",
            "the router was not written (or was initialised and never trained): reconvert",
            layer=layer,
            experts=zero,
        )
    ]


def _copies(layer: int, what: str, g_EE: Tensor, tensors: dict[str, Tensor]) -> list[Finding]:
    rel = relative_differences(g_EE)
    norms = g_EE.diagonal().sqrt()
    cos = g_EE / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    E = rel.shape[0]
    pairs = [(i, j) for i in range(E) for j in range(i + 1, E) if rel[i, j] < NEAR_COPY]
    pairs = [(i, j) for i, j in pairs if norms[i] > 0 or norms[j] > 0]  # zeros: _zero_*
    if not pairs:
        return []
    exact = [(i, j) for i, j in pairs if all(torch.equal(t[i], t[j]) for t in tensors.values())]
    worst = max(pairs, key=lambda p: float(cos[p]))
    experts = sorted({e for pair in pairs for e in pair})
    kind = "exact copies" if len(exact) == len(pairs) else "copies (near or exact)"
    return [
        Finding(
            "error",
            "weights.copies" if what == "experts" else "weights.router_copies",
            f"layer {layer}: {what} are {kind} of each other: pairs {pairs[:8]}"
            + (f" and {len(pairs) - 8} more" if len(pairs) > 8 else ""),
            "experts that compute the same function waste their share of the tokens; a "
            "converter that wrote several experts from one tensor does this: reconvert from "
            "the source checkpoint (right after upcycling, copies are expected)"
            if what == "experts"
            else "two identical router rows give their experts the same logit for every "
            "token, so they tie on every token: the router was written from one row",
            layer=layer,
            experts=experts,
            evidence={
                "relative_difference": float(rel[worst]),
                "cosine": float(cos[worst]),
                "threshold": NEAR_COPY,
                "exact_pairs": len(exact),
            },
        )
    ]


def _norm_outliers(layer: int, tensors: dict[str, Tensor]) -> list[Finding]:
    findings = []
    for name in ("w_up", "w_down"):
        t = tensors[name].detach()
        norms = t.reshape(t.shape[0], -1).double().norm(dim=1)
        median = norms.median()
        if t.shape[0] < 3 or median == 0:
            continue
        ratio = norms / median
        odd = ((ratio > NORM_RATIO) | ((ratio < 1 / NORM_RATIO) & (norms > 0))).nonzero()
        for e in odd.flatten().tolist():
            findings.append(
                Finding(
                    "warning",
                    "weights.norm",
                    f"layer {layer}: expert {e}'s {name} has {float(ratio[e]):.3g}x the median "
                    f"norm of its {t.shape[0] - 1} siblings",
                    "a tensor of another scale (a missing dequantisation scale, another "
                    "layout) was written into this expert: compare it with the source",
                    layer=layer,
                    experts=[e],
                    evidence={
                        "norm": float(norms[e]),
                        "median": float(median),
                        "ratio": float(ratio[e]),
                        "threshold": NORM_RATIO,
                    },
                )
            )
    return findings


def _same_across_layers(layers: list[tuple[int, MoE]]) -> list[Finding]:
    """Layers whose router (or whose experts) equal another layer's."""
    findings = []
    for what, get in (
        ("router", lambda m: m.router.weight),
        ("experts", lambda m: m.experts.w_up),
    ):
        for a in range(len(layers)):
            for b in range(a + 1, len(layers)):
                (la, ma), (lb, mb) = layers[a], layers[b]
                ta, tb = get(ma).detach(), get(mb).detach()
                if ta.shape != tb.shape or not (ta.norm() > 0):
                    continue
                rel = float((ta.double() - tb.double()).norm() / ta.double().norm())
                if rel < NEAR_COPY:
                    findings.append(_layer_copy(what, la, lb, rel))
    return findings


def _layer_copy(what: str, la: int, lb: int, rel: float) -> Finding:
    return Finding(
        "error",
        "weights.layer_copies",
        f"layers {la} and {lb} have the same {what} (relative difference {rel:.2g})",
        "a converter wrote one layer's tensors into several layers: reconvert",
        layer=lb,
        evidence={"relative_difference": rel, "threshold": NEAR_COPY, "same_as_layer": la},
    )
