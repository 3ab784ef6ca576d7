"""Routing checks on calibration text: dead, starved and collapsed experts, layers that route
alike, and tokens whose top-k margin is below the rounding of a bf16 engine.

# T tokens, E experts, K top_k

The dead / starved / collapse thresholds are the trainer's (train/health.py), so a run that
trained without a routing warning gets none here on similar text (docs/doctor.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..models.expert_ids import tap_routers
from ..report.stats import entropy_bits, mutual_information
from ..routing.base import TokenChoice
from ..train.health import MIN_EXPECTED_ASSIGNMENTS, routing_health
from .findings import Finding
from .weights import moe_layers

# Two layers route alike when their top-1 choices determine each other: the mutual
# information of the (E x E) top-1 table over the smaller of the two entropies.
LAYERS_ALIKE = 0.9
# Shares of tokens whose k-th and (k+1)-th scores are closer than the rounding: a note from
# MARGIN_NOTE on (each such token may route differently in another engine), a warning from
# MARGIN_WARNING on.
MARGIN_NOTE = 0.01
MARGIN_WARNING = 0.5
SEQUENCE = 256  # calibration tokens per row
# A run's own text is read in many short windows, so that every domain of its validation
# split is seen (routing needs little context).
WINDOW = 64


@dataclass
class LayerRouting:
    """What one layer did with the calibration tokens."""

    counts_E: Tensor
    top1: list[Tensor] = field(default_factory=list)
    close: int = 0
    tokens: int = 0
    entropy: float = 0.0


def calibration_ids(encode, text: str | None, num_tokens: int, vocab_size: int, seed: int = 0):
    """(token ids (1-D), where they came from): the text through the tokenizer, or random ids
    when there is no tokenizer; at most num_tokens."""
    if encode is None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
        return ids, f"{num_tokens} random token ids (no tokenizer.json)"
    ids = torch.tensor(encode(text), dtype=torch.long)
    if len(ids) == 0:
        raise ValueError("the calibration text encodes to no tokens")
    ids = ids[:num_tokens].clamp_max(vocab_size - 1)
    return ids, f"{len(ids)} tokens"


def spread_tokens(tokens_N, num_tokens: int) -> Tensor:
    """At most num_tokens of a long (numpy) stream, in WINDOW-token windows spread evenly
    over it; only those windows are read."""
    length = min(WINDOW, num_tokens, len(tokens_N))
    windows = max(min(num_tokens, len(tokens_N)) // length, 1)
    starts = np.linspace(0, len(tokens_N) - length, windows).astype(np.int64).tolist()
    return torch.cat(
        [torch.from_numpy(np.asarray(tokens_N[s : s + length], dtype=np.int64)) for s in starts]
    )


@torch.no_grad()
def observe(
    model: nn.Module, ids: Tensor, dtype: torch.dtype, row: int = SEQUENCE
) -> dict[int, LayerRouting]:
    """Run the tokens through model in rows of `row` tokens and gather each MoE layer's
    routing."""
    layers = {i: None for i, _ in moe_layers(model)}
    num_experts = {i: m.router.weight.shape[0] for i, m in moe_layers(model)}
    top_k = {i: m.config.top_k for i, m in moe_layers(model)}
    # the unit roundoff (half the spacing of the floats, relative) of bf16 or coarser
    eps = max(torch.finfo(torch.bfloat16).eps, torch.finfo(dtype).eps) / 2
    length = min(row, model.config.max_seq_len)
    for row in ids.split(length):
        with tap_routers(model.layers) as decisions:
            model(row[None])
        for i, decision in enumerate(decisions):
            if i in layers and isinstance(decision, TokenChoice):
                seen = layers[i] or LayerRouting(torch.zeros(num_experts[i], dtype=torch.float64))
                _add(seen, decision, top_k[i], eps)
                layers[i] = seen
    return {i: seen for i, seen in layers.items() if seen is not None}


def _add(seen: LayerRouting, decision: TokenChoice, top_k: int, eps: float) -> None:
    ids_TK = decision.ids_TK
    valid = (
        torch.ones_like(ids_TK, dtype=torch.bool)
        if decision.valid_TK is None
        else decision.valid_TK
    )
    seen.counts_E += torch.bincount(ids_TK[valid], minlength=len(seen.counts_E)).double()
    seen.top1.append(ids_TK[:, 0].clone())
    probs_TE = decision.probs_TE.float()
    seen.entropy += float(-(probs_TE * probs_TE.clamp_min(1e-30).log()).sum())
    seen.tokens += ids_TK.shape[0]
    rank_TE = decision.rank_TE.float()
    if rank_TE.shape[1] <= top_k:
        return
    values, ids = rank_TE.topk(top_k + 1, dim=1)
    kth, nxt = values[:, top_k - 1], values[:, top_k]
    # A logit rounded by at most eps * |z| moves its gate g (softmax probability or sigmoid score,
    # which the ranking follows) by about g (1 - g) eps |z|.
    ends = ids[:, top_k - 1 :]
    z, g = decision.logits_TE.float().gather(1, ends), decision.gate_TE.float().gather(1, ends)
    moved = (g * (1 - g) * eps * z.abs()).sum(1)
    both = torch.isfinite(kth) & torch.isfinite(nxt)
    seen.close += int(((kth - nxt) <= moved)[both].sum())


def check_routing(seen: dict[int, LayerRouting], top_k: int) -> list[Finding]:
    """Health of each layer, layers that route alike, and the margins."""
    findings = []
    for layer, routing in seen.items():
        for issue in routing_health(routing.counts_E, top_k, layer):
            findings.append(_from_issue(issue, routing))
    findings += _too_few(seen, top_k)
    findings += _alike(seen)
    findings += _margins(seen)
    return findings


def _from_issue(issue, routing: LayerRouting) -> Finding:
    num_experts = len(routing.counts_E)
    entropy = routing.entropy / max(routing.tokens, 1) / math.log(max(num_experts, 2))
    advice = {
        "dead": "these experts are paid for and never used: check their router rows and "
        "biases, try calibration text of the domain you will train on (--data), and keep "
        "a balance loss or bias balancing on when fine-tuning",
        "starved": "these experts learn from very few tokens: fine-tune with a balance "
        "loss (or bias balancing) and watch their load",
        "collapse": "nearly every token goes to the same experts: check the router "
        "(copied rows, a huge bias, a wrong scale) before training; fine-tuning a "
        "collapsed router needs a balance loss",
    }[issue.kind]
    evidence = dict(issue.evidence)
    evidence.update(
        figure=issue.figure,
        threshold=issue.threshold,
        load_cv=float(
            routing.counts_E.std(unbiased=False) / routing.counts_E.mean().clamp_min(1e-12)
        ),
        router_entropy=entropy,
    )
    return Finding(
        issue.severity,
        f"routing.{issue.kind}",
        issue.text,
        advice,
        layer=issue.layer,
        experts=issue.experts,
        evidence=evidence,
    )


def _too_few(seen: dict[int, LayerRouting], top_k: int) -> list[Finding]:
    """A note when the tokens are too few to call any expert dead or starved."""
    if not seen:
        return []
    routing = next(iter(seen.values()))
    num_experts = len(routing.counts_E)
    uniform = float(routing.counts_E.sum()) / num_experts
    if uniform >= MIN_EXPECTED_ASSIGNMENTS:
        return []
    needed = math.ceil(MIN_EXPECTED_ASSIGNMENTS * num_experts / top_k)
    return [
        Finding(
            "note",
            "routing.too_few_tokens",
            f"{routing.tokens} calibration tokens give each expert {uniform:.1f} assignments "
            f"under uniform routing: too few to call an expert dead or starved",
            f"give at least {needed} tokens of text (--data, --tokens)",
            evidence={"tokens": routing.tokens, "needed": needed},
        )
    ]


def _alike(seen: dict[int, LayerRouting]) -> list[Finding]:
    findings = []
    layers = sorted(seen)
    for a_i, a in enumerate(layers):
        for b in layers[a_i + 1 :]:
            ids_a, ids_b = torch.cat(seen[a].top1), torch.cat(seen[b].top1)
            E_a, E_b = len(seen[a].counts_E), len(seen[b].counts_E)
            table = np.zeros((E_a, E_b))
            np.add.at(table, (ids_a.numpy(), ids_b.numpy()), 1)
            entropy = min(entropy_bits(table.sum(1)), entropy_bits(table.sum(0)))
            if entropy <= 0:
                continue
            shared = mutual_information(table) / entropy
            if shared >= LAYERS_ALIKE:
                findings.append(
                    Finding(
                        "warning",
                        "routing.layers_alike",
                        f"layers {a} and {b} route alike: layer {b}'s top-1 expert follows "
                        f"from layer {a}'s for {shared:.0%} of its information",
                        "two layers with the same routing usually share a router by mistake "
                        "(a conversion that wrote one layer's router everywhere): compare "
                        "their router weights",
                        layer=b,
                        evidence={
                            "normalised_mutual_information": shared,
                            "threshold": LAYERS_ALIKE,
                            "same_as_layer": a,
                        },
                    )
                )
    return findings


def _margins(seen: dict[int, LayerRouting]) -> list[Finding]:
    close = sum(r.close for r in seen.values())
    tokens = sum(r.tokens for r in seen.values())
    if not tokens:
        return []
    share = close / tokens
    if share < MARGIN_NOTE:
        return []
    worst = max(seen, key=lambda i: seen[i].close / max(seen[i].tokens, 1))
    return [
        Finding(
            "warning" if share >= MARGIN_WARNING else "note",
            "routing.margins",
            f"{share:.1%} of the token-layer routings have their k-th and (k+1)-th expert "
            "scores closer than bf16 rounding: they can pick another expert in another "
            f"engine or dtype (layer {worst} most: "
            f"{seen[worst].close / max(seen[worst].tokens, 1):.1%})",
            "compare engines on the same text with `moekit routing record` and "
            "`moekit routing diff` (docs/traces.md) before trusting routing-sensitive results",
            layer=worst,
            evidence={"share": share, "note_from": MARGIN_NOTE, "warning_from": MARGIN_WARNING},
        )
    ]
