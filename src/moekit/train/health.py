"""Training health: the guard against non-finite steps, and routing health from expert counts.

# E experts, K top_k

Two things a run can get wrong without a word:
- a step whose loss or gradient is not finite (a learning rate too high, an overflow):
  AdamW turns one such step into non-finite weights, and the next checkpoint saves them.
  StepGuard stops the run before the optimizer sees the step (train.on_nonfinite "error")
  or drops the batch and counts it ("skip").
- experts no token reaches (dead), far below their share (starved), or a layer whose
  tokens all go to a few experts (collapse). `routing_health` judges one layer's counts;
  the trainer checks at each evaluation and `moekit doctor` on calibration text, with the
  same thresholds (docs/doctor.md gives the reasons for each figure).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ON_NONFINITE = ("error", "skip")

# Routing health thresholds (docs/doctor.md, "Routing").
# An expert is judged (dead or starved) only when uniform routing would give it at least
# this many assignments: with fewer, a healthy expert may see none by chance.
MIN_EXPECTED_ASSIGNMENTS = 16
# Starved: a load below this fraction of the uniform load T * K / E.
STARVED_RATIO = 0.05
# Collapse: the load's entropy between its floor log K (every token on the same K experts)
# and log E (uniform), as a fraction; below this, the layer routes nearly everything to a
# few experts.
COLLAPSE_SPREAD = 0.35


class NonFiniteStepError(ValueError):
    """A training step's loss or gradient was not finite (train.on_nonfinite "error")."""


@dataclass
class HealthIssue:
    """One routing-health condition of one layer.

    kind: "dead", "starved" or "collapse"; experts: the experts concerned (for collapse,
    the busiest ones); figure and threshold: the measured value and the limit it crossed.
    """

    kind: str
    layer: int
    experts: list[int]
    figure: float
    threshold: float
    text: str
    severity: str = "warning"
    evidence: dict = field(default_factory=dict)


def spread(counts_E: Tensor, top_k: int) -> float:
    """How evenly the load is spread: 0 when every assignment goes to the same top_k
    experts, 1 when uniform (the load entropy between log K and log E)."""
    counts = counts_E.double().clamp_min(0)
    total = counts.sum()
    num_experts = counts.numel()
    if total <= 0 or num_experts <= top_k:
        return 1.0
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    floor, ceiling = math.log(top_k), math.log(num_experts)
    return max(0.0, (entropy - floor) / (ceiling - floor))


def routing_health(counts_E: Tensor, top_k: int, layer: int) -> list[HealthIssue]:
    """The routing-health issues of one layer's assignment counts.

    Args:
        counts_E: (E,) assignments per expert (each token counts once per chosen expert).
        top_k: experts per token (the mean for top_p routing, rounded up).
        layer: the layer's index, for the messages.
    Returns:
        Dead experts, starved experts and collapse, each at most one HealthIssue.
    """
    counts = counts_E.detach().double().cpu()
    num_experts, total = counts.numel(), float(counts.sum())
    uniform = total / max(num_experts, 1)
    issues = []
    if uniform >= MIN_EXPECTED_ASSIGNMENTS:
        dead = [e for e in range(num_experts) if counts[e] == 0]
        if dead:
            issues.append(_dead(layer, dead, total, uniform))
        starved = [e for e in range(num_experts) if 0 < counts[e] < STARVED_RATIO * uniform]
        if starved:
            issues.append(_starved(layer, starved, counts, uniform))
    level = spread(counts, top_k)
    if total > 0 and level < COLLAPSE_SPREAD and uniform >= MIN_EXPECTED_ASSIGNMENTS:
        busiest = counts.argsort(descending=True)[:top_k].tolist()
        share = float(counts[busiest].sum() / total)
        issues.append(
            HealthIssue(
                "collapse",
                layer,
                busiest,
                level,
                COLLAPSE_SPREAD,
                f"layer {layer}: routing collapsed: experts {busiest} take {share:.0%} of the "
                f"assignments (load spread {level:.2f} < {COLLAPSE_SPREAD}; 0 = all on {top_k} "
                "experts, 1 = uniform)",
                severity="error",
                evidence={"share": share, "spread": level},
            )
        )
    return issues


def _dead(layer: int, dead: list[int], total: float, uniform: float) -> HealthIssue:
    return HealthIssue(
        "dead",
        layer,
        dead,
        0.0,
        MIN_EXPECTED_ASSIGNMENTS,
        f"layer {layer}: {_experts(dead)} received no token of {total:.0f} assignments "
        f"(uniform routing gives each {uniform:.0f})",
        evidence={"assignments": total, "uniform": uniform},
    )


def _starved(layer: int, starved: list[int], counts: Tensor, uniform: float) -> HealthIssue:
    loads = {e: int(counts[e]) for e in starved}
    return HealthIssue(
        "starved",
        layer,
        starved,
        min(loads.values()) / uniform,
        STARVED_RATIO,
        f"layer {layer}: {_experts(starved)} starved: loads {loads} below "
        f"{STARVED_RATIO:.0%} of the uniform {uniform:.0f}",
        evidence={"loads": loads, "uniform": uniform},
    )


def _experts(experts: list[int]) -> str:
    return f"expert {experts[0]}" if len(experts) == 1 else f"experts {experts}"


_LAYER = re.compile(r"layers\.(\d+)\.")


def parameter_place(name: str) -> str:
    """'layer L' from a parameter name (or '' when it belongs to no layer)."""
    match = _LAYER.search(name)
    return f"layer {match.group(1)}" if match else ""


def first_nonfinite_gradient(model: nn.Module) -> str | None:
    """The first parameter (in the model's order) whose gradient is not finite, with its
    layer and, for the experts' 3-D weights, the first such expert; None if all are."""
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        bad = ~torch.isfinite(grad)
        if not bad.any():
            continue
        place = [parameter_place(name)] if parameter_place(name) else []
        if ".experts." in name and grad.dim() == 3:
            place.append(f"expert {int(bad.flatten(1).any(1).nonzero()[0])}")
        return f"{name} ({', '.join(place)})" if place else name
    return None


class StepGuard:
    """Keeps non-finite steps away from the optimizer and from the checkpoints.

    check() runs after the gradients are reduced and before optimizer.step(): True means
    skip this step. With on_nonfinite "error" a non-finite step raises NonFiniteStepError
    naming the step and the first parameter whose gradient is not finite.

    Args:
        on_nonfinite: "error" or "skip" (TrainConfig.on_nonfinite).
        run: the Run; every rank takes the same decision (run.any).
        log: prints a line (rank 0's console).
    """

    def __init__(self, on_nonfinite: str, run, log: Callable[[str], None]):
        self.on_nonfinite, self.run, self.log = on_nonfinite, run, log
        self.skipped = 0

    def check(
        self,
        step: int,
        loss: float,
        model: nn.Module,
        rerun: Callable[[], object],
        saved_step: int | None,
        grad_norm: float,
    ) -> bool:
        """Whether step `step` (1-based) must be skipped; raises under "error".

        rerun: the step's forward and backward again, into zeroed gradients: clipping a
        non-finite norm spreads NaN to every gradient, so the first bad one is found anew.
        saved_step: the step the run's checkpoint holds (None: none written yet).
        """
        if not self.run.any(not (math.isfinite(loss) and math.isfinite(float(grad_norm)))):
            return False
        what = f"step {step}: loss {loss:.4g}, gradient norm {float(grad_norm):.4g}"
        if self.on_nonfinite == "skip":
            self.skipped += 1
            self.log(f"warning: {what}: batch skipped ({self.skipped} skipped so far)")
            return True
        where = "on another rank"
        if self.run.world_size == 1:
            model.zero_grad(set_to_none=True)
            rerun()
        where = first_nonfinite_gradient(model) or where
        kept = (
            "no checkpoint was written"
            if saved_step is None
            else f"the checkpoint of step {saved_step} is left as it was"
        )
        raise NonFiniteStepError(
            f"{what}: not finite; first non-finite gradient: {where}. The run stopped before "
            f"the optimizer step; {kept}. Lower train.lr (or raise train.warmup_steps), or "
            "pass --train.on_nonfinite skip to drop such batches"
        )


class RoutingWatch:
    """Routing health at each evaluation, from the training steps' counts since the last.

    Each condition (kind, layer) is warned about once per run.

    Args:
        top_k: the layers' experts per token.
        run: the Run; the counts are summed over the ranks before they are judged.
        log: prints a line.
    """

    def __init__(self, top_k: int, run, log: Callable[[str], None]):
        self.top_k, self.run, self.log = top_k, run, log
        self._counts: dict[int, Tensor] = {}
        self.warned: set[tuple[str, int]] = set()

    def add(self, stats: list) -> None:
        """Accumulate a step's per-layer MoEStats (None for dense layers); no device sync."""
        for layer, layer_stats in enumerate(stats):
            if layer_stats is not None:
                counts = layer_stats.tokens_per_expert.detach().double()
                previous = self._counts.get(layer)
                self._counts[layer] = counts if previous is None else previous + counts

    def check(self, step: int) -> list[HealthIssue]:
        """Judge the counts since the last check, warn about new conditions, and reset."""
        found = []
        for layer, counts in sorted(self._counts.items()):
            for issue in routing_health(self.run.sum(counts), self.top_k, layer):
                if (issue.kind, layer) not in self.warned:
                    self.warned.add((issue.kind, layer))
                    self.log(f"warning: step {step}: {issue.text}")
                    found.append(issue)
        self._counts = {}
        return found
