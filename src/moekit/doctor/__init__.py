"""`moekit doctor`: the silent failures of an MoE checkpoint, run or adapter, with evidence.

One module per family of checks, each a function of what the target holds that returns
Findings (findings.py): weights.py (copied, zero, non-finite or mis-scaled experts and
routers), routing.py (dead, starved and collapsed experts on calibration text, layers that
route alike, margins below the rounding), runs.py (a training run's losses, bias, router
and expert updates, drops), adapters.py (PEFT LoRA adapters against their base). target.py
reads the target (never writing to it); cli.py is the command. docs/doctor.md gives every
threshold and its reason.
"""

from .findings import Finding, Report

__all__ = ["Finding", "Report"]
