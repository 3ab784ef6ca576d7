"""Training-run checks: losses that never acted, a bias or router that never moved, experts
that got no gradient lately, drops above what the capacity implies, diverged or skipped
steps. They read the run's config.json, metrics.jsonl, routing.jsonl and checkpoint.

# E experts
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import CHECKPOINT_DIR, OPTIMIZER_FILE, read_checkpoint_state
from ..models import Transformer
from ..train.config import model_config_from_dict, train_config_from_dict
from ..train.metrics import ROUTING_FILE, read_metrics
from .findings import Finding
from .weights import moe_layers

# The last training records judged for drops.
RECENT = 10
# Dropped share of assignments above the balanced-load expectation max(0, 1 - cf) by this.
DROP_EXCESS = 0.10
# An expert's AdamW first moment (decaying by beta1 each step) below this fraction of its
# siblings' median: no gradient reached it in the last tens of steps.
STALE_MOMENT = 1e-3
# ||p - s p0|| / ||p|| (s the best scale) below this: the tensor never moved from its
# initialisation, or only by weight decay.
UNMOVED = 1e-6


def check_run(run_dir: Path, model: nn.Module, run_config: dict, facts: dict) -> list[Finding]:
    """The run checks; the trained model is the one the doctor loaded."""
    model_config = model_config_from_dict(run_config["model"])
    train_config = train_config_from_dict(run_config["train"])
    _, state = read_checkpoint_state(run_dir)
    facts["steps"] = state["step"]
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    routing = (
        read_metrics(run_dir / ROUTING_FILE, "train") if (run_dir / ROUTING_FILE).is_file() else []
    )
    train = [r for r in metrics if r.get("split") == "train"]
    findings = _diverged(metrics)
    if model_config.moe is None or state["step"] == 0:
        return findings
    findings += _losses(model_config.moe, train, routing)
    findings += _drops(model_config.moe, train)
    if run_config.get("converted_from") is None:
        unequal = _unequal_loads(routing)
        findings += _unmoved(model, model_config, train_config.seed, unequal)
    findings += _stale_experts(run_dir, model)
    return findings


def _diverged(metrics: list[dict]) -> list[Finding]:
    findings = []
    bad = [
        r["step"]
        for r in metrics
        if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])
    ]
    if bad:
        findings.append(
            Finding(
                "error",
                "run.nonfinite",
                f"the logged loss is not finite from step {bad[0]} on ({len(bad)} records)",
                "the run diverged and its later checkpoints hold what came after: lower the "
                "learning rate; moekit train now stops at such a step (train.on_nonfinite)",
                evidence={"first_step": bad[0], "records": len(bad)},
            )
        )
    skipped = max((r.get("skipped_steps", 0) for r in metrics), default=0)
    if skipped:
        findings.append(
            Finding(
                "note",
                "run.skipped",
                f"{skipped} batches were skipped as non-finite (train.on_nonfinite skip)",
                "a few skips are survivable; many mean the learning rate is too high",
                evidence={"skipped": skipped},
            )
        )
    return findings


def _losses(moe, train: list[dict], routing: list[dict]) -> list[Finding]:
    findings = []
    for name, coef in (("balance_loss", moe.balance_loss_coef), ("z_loss", moe.z_loss_coef)):
        if coef <= 0 or not routing:
            continue
        values = [layer[name] for r in routing for layer in r["layers"]]
        if values and all(v == 0 for v in values):
            findings.append(
                Finding(
                    "error",
                    "run.loss_inactive",
                    f"{name} is configured (coefficient {coef:g}) but was 0 in every "
                    f"routing record ({len(routing)} records)",
                    "the loss never reached the optimizer: check that the router's loss is "
                    "computed in training and added to the loss",
                    evidence={"coefficient": coef, "records": len(routing)},
                )
            )
    if (moe.balance_loss_coef > 0 or moe.z_loss_coef > 0) and train:
        if all(r.get("aux_loss", 0) == 0 for r in train):
            findings.append(
                Finding(
                    "error",
                    "run.loss_inactive",
                    f"balance and z losses are configured but aux_loss was 0 at every one of "
                    f"{len(train)} logged steps",
                    "the auxiliary loss was never added to the training loss",
                    evidence={"steps": len(train)},
                )
            )
    return findings


def _drops(moe, train: list[dict]) -> list[Finding]:
    if moe.capacity_factor is None or not train:
        return []
    recent = [r["dropped_fraction"] for r in train[-RECENT:] if "dropped_fraction" in r]
    if not recent:
        return []
    dropped = sum(recent) / len(recent)
    expected = max(0.0, 1.0 - moe.capacity_factor)
    if dropped <= expected + DROP_EXCESS:
        return []
    return [
        Finding(
            "warning",
            "run.drops",
            f"{dropped:.1%} of the assignments were dropped over the last {len(recent)} "
            f"logged steps; capacity_factor {moe.capacity_factor:g} implies {expected:.0%} "
            "for a balanced router",
            "the router is unbalanced (raise balance_loss_coef) or the capacity is too small",
            evidence={"dropped": dropped, "implied": expected, "excess_allowed": DROP_EXCESS},
        )
    ]


def _unequal_loads(routing: list[dict]) -> set[int]:
    """Layers whose logged expert loads were ever unequal: their balancing bias must move
    (the update is rate * sign(mean load - load), 0 for a perfectly even layer)."""
    return {
        layer["layer"]
        for record in routing
        for layer in record["layers"]
        if len(set(layer["tokens_per_expert"])) > 1
    }


def _unmoved(model: nn.Module, model_config, seed: int, unequal: set[int]) -> list[Finding]:
    """Compare with the run's initialisation, rebuilt as the trainer built it."""
    torch.manual_seed(seed)
    init = Transformer(model_config)
    findings = []
    initial = dict(moe_layers(init))
    for layer, trained in moe_layers(model):
        start = initial[layer]
        if _moved(trained.router.weight, start.router.weight) < UNMOVED:
            findings.append(
                _frozen(layer, "router", "the router never moved from its initialisation")
            )
        bias = getattr(trained.router, "bias", None)
        if isinstance(bias, torch.Tensor) and model_config.moe.bias_update_rate > 0:
            if layer in unequal and torch.equal(bias, start.router.bias):
                findings.append(
                    _frozen(layer, "bias", "the bias-balancing bias is still at its initial value")
                )
        for name in ("w_up", "w_down"):
            p, p0 = getattr(trained.experts, name), getattr(start.experts, name)
            still = [e for e in range(p.shape[0]) if _moved(p[e], p0[e]) < UNMOVED]
            if still and len(still) < p.shape[0]:
                findings.append(
                    _frozen(
                        layer,
                        name,
                        f"experts {still}' {name} never moved (no gradient ever reached them)",
                        still,
                    )
                )
    return findings


def _moved(p: torch.Tensor, p0: torch.Tensor) -> float:
    p, p0 = p.detach().double().flatten(), p0.detach().double().flatten()
    scale = (p @ p0) / (p0 @ p0).clamp_min(1e-300)
    return float((p - scale * p0).norm() / p.norm().clamp_min(1e-300))


def _frozen(layer: int, what: str, text: str, experts: list[int] | None = None) -> Finding:
    advice = {
        "router": "the router was frozen by accident (requires_grad off, a trainable "
        "pattern that leaves it out, or its loss detached): check train.trainable",
        "bias": "the aux-loss-free bias is never updated: the update must run after each "
        "optimizer step (moekit.update_router_biases)",
    }.get(what, "these experts received no token or no gradient: see the routing checks")
    return Finding(
        "error" if what in ("router", "bias") else "warning",
        "run.unmoved",
        f"layer {layer}: {text}",
        advice,
        layer=layer,
        experts=experts or [],
        evidence={"threshold": UNMOVED},
    )


def _stale_experts(run_dir: Path, model: nn.Module) -> list[Finding]:
    path = run_dir / CHECKPOINT_DIR / OPTIMIZER_FILE
    if not path.is_file():
        return []
    findings = []
    with safe_open(path, framework="pt") as file:
        names = set(file.keys())
        for layer, _ in moe_layers(model):
            key = f"layers.{layer}.ffn.experts.w_up.exp_avg"
            if key not in names:
                continue
            moment = file.get_tensor(key).double()
            norms = moment.reshape(moment.shape[0], -1).norm(dim=1)
            median = norms.median()
            stale = (norms < STALE_MOMENT * median).nonzero().flatten().tolist()
            if stale and median > 0:
                findings.append(
                    Finding(
                        "warning",
                        "run.stale_experts",
                        f"layer {layer}: experts {stale} got no gradient in the last steps "
                        "(their AdamW first moment has decayed to nothing)",
                        "no token reached them lately: look at the routing checks and the "
                        "balance loss",
                        layer=layer,
                        experts=stale,
                        evidence={
                            "moment_norms": [float(norms[e]) for e in stale],
                            "median": float(median),
                            "threshold": STALE_MOMENT,
                        },
                    )
                )
    return findings


def check_hf_config(hf: dict, model: nn.Module) -> list[Finding]:
    """What a Hugging Face folder's config leaves silent in fine-tuning."""
    findings = []
    coef = hf.get("router_aux_loss_coef") or 0
    if coef > 0 and not hf.get("output_router_logits", False):
        findings.append(
            Finding(
                "note",
                "config.balance_loss_off",
                f"router_aux_loss_coef is {coef:g} but output_router_logits is false: "
                "transformers adds the balance loss to the training loss only when the "
                "router logits are output",
                "set output_router_logits=True before fine-tuning in transformers (moekit "
                "finetune keeps its balance loss on)",
                evidence={"router_aux_loss_coef": coef},
            )
        )
    zero = [
        layer
        for layer, moe in moe_layers(model)
        if isinstance(getattr(moe.router, "bias", None), torch.Tensor) and not moe.router.bias.any()
    ]
    if zero:
        findings.append(
            Finding(
                "note",
                "config.bias_zero",
                f"the bias-balancing biases (e_score_correction_bias) are all zero in layers "
                f"{zero}: they were never updated, or not saved",
                "if the source was trained with bias balancing, its biases were lost in "
                "conversion; update them while fine-tuning (moekit does)",
                layer=zero[0],
            )
        )
    return findings
