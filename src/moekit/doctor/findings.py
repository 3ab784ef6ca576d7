"""A Finding (severity, check, evidence, what to do) and the Report that prints them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

SEVERITIES = ("error", "warning", "note")


@dataclass
class Finding:
    """One thing the doctor found.

    severity: "error" (the model or run is wrong: the exit status is 1), "warning" (likely
    wrong, look before training) or "note" (worth knowing). check: the check's name
    ("weights.copies", ...). layer and experts: where, when it is somewhere. evidence: the
    figures and the threshold they crossed. advice: what to do.
    """

    severity: str
    check: str
    message: str
    advice: str = ""
    layer: int | None = None
    experts: list[int] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.severity in SEVERITIES, self.severity


@dataclass
class Report:
    """Everything the doctor found about one target.

    target: the path; kind: "run", "hf" or "adapter"; checks: the check families that ran;
    facts: what was read (architecture, layers, experts, calibration tokens, ...).
    """

    target: str
    kind: str
    checks: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, findings: list[Finding]) -> None:
        self.findings.extend(findings)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def exit_status(self) -> int:
        """1 when there is an error, else 0."""
        return 1 if self.count("error") else 0

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "kind": self.kind,
            "checks": self.checks,
            "facts": self.facts,
            "counts": {s: self.count(s) for s in SEVERITIES},
            "findings": [dataclasses.asdict(f) for f in self._sorted()],
        }

    def _sorted(self) -> list[Finding]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(self.findings, key=lambda f: (order[f.severity], f.check, f.layer or -1))

    def text(self) -> str:
        """The report for a terminal: what was read, then each finding with its evidence."""
        lines = [f"moekit doctor: {self.target} ({self.kind})"]
        for key, value in self.facts.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  checks: {', '.join(self.checks)}")
        for finding in self._sorted():
            lines.append("")
            lines.append(f"{finding.severity}: [{finding.check}] {finding.message}")
            if finding.evidence:
                shown = ", ".join(f"{k} {_show(v)}" for k, v in finding.evidence.items())
                lines.append(f"  evidence: {shown}")
            if finding.advice:
                lines.append(f"  do: {finding.advice}")
        counts = ", ".join(
            f"{self.count(s)} {s}{'s' if self.count(s) != 1 else ''}" for s in SEVERITIES
        )
        lines.append("")
        lines.append(f"{counts}" + ("" if self.findings else ": nothing wrong found"))
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, default=_show)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
