"""Compiling the training step: what is compiled, and when `--train.compile auto` does it.

What: every transformer block, each through its own `Block.compile()` (regional
compilation, as torchtitan does per block). Blocks of the same kind run the same code, so
dynamo traces one graph and every layer of that kind reuses it: compile time does not grow
with depth. The embedding, the output head and the loss stay eager, and so does evaluation
(the Trainer evaluates under `torch.compiler.set_stance("force_eager")`). Inductor
keeps its compiled kernels in an on-disk cache, so a second job on the same machine
compiles in a few seconds instead of tens.

When ("auto"): the first PROBE_STEPS steps run eager; their median time, the steps left
and two measured constants predict what compiling saves and costs:
    compile when  steps_left * eager_step_s * COMPILED_SAVING  >  COMPILE_SECONDS
The decision, with those figures, is printed. A comparison passes one CompileDecision to
both of its trainers, so the MoE and its dense twin always run under the same setting.
"""

from __future__ import annotations

import statistics

from torch import nn

# Measured on the default job's models on 2 cores (bench/train_step.py; docs/results.md,
# "Where the time goes"): compiled blocks save 13% of the MoE's step and 9% of the dense
# twin's (the smaller counts); the first compiled step of the MoE takes 15 s (a cold cache; the dense
# twin's 5 s). Under these the default job (225 steps of ~0.6 s) stays eager, where a
# compile would pay back only after ~190 of the MoE's steps; a job twice as long compiles.
COMPILED_SAVING = 0.09
COMPILE_SECONDS = 15.0
# Eager steps timed before "auto" decides (the first step, with its allocations, is not used).
PROBE_STEPS = 4


class CompileDecision:
    """The train.compile setting, resolved once ("true"/"false" at once, "auto" after a probe).

    Args:
        setting: "auto", "true" or "false" (TrainConfig.compile).
        log: where the decision line goes (print by default).
    """

    def __init__(self, setting: str, log=print):
        self.setting = setting
        self.log = log
        self.compiled: bool | None = {"true": True, "false": False}.get(setting)
        self.reason = "" if self.compiled is None else f"train.compile {setting}"

    @property
    def decided(self) -> bool:
        return self.compiled is not None

    def settle(self, compiled: bool, reason: str) -> None:
        """Resolve "auto" without a probe (e.g. eager under torchrun); the reason is logged."""
        if self.compiled is None:
            self.compiled, self.reason = compiled, reason
            self.log(reason)

    def decide(self, step_seconds: list[float], steps_left: int) -> bool:
        """Resolve "auto" from the eager steps so far (the first one is skipped); returns
        whether to compile. Later calls return the first answer."""
        if self.compiled is not None:
            return self.compiled
        step_s = statistics.median(step_seconds[1:] or step_seconds)
        saving = steps_left * step_s * COMPILED_SAVING
        self.compiled = saving > COMPILE_SECONDS
        verb = "compiling" if self.compiled else "staying eager"
        self.reason = (
            f"train.compile auto: {verb} ({steps_left} steps left x {step_s:.2f} s x "
            f"{COMPILED_SAVING:.0%} saved = {saving:.0f} s "
            f"{'>' if self.compiled else '<='} ~{COMPILE_SECONDS:.0f} s to compile)"
        )
        self.log(self.reason)
        return self.compiled


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block of model in place (regional compilation)."""
    for block in model.layers:
        block.compile()


def uncompile_blocks(model: nn.Module) -> None:
    """Undo compile_blocks: each block calls its eager forward again.

    nn.Module.compile() keeps the compiled call in `_compiled_call_impl`; None restores
    the module's own call (torch's nn.Module checks exactly that attribute).
    """
    for block in model.layers:
        block._compiled_call_impl = None
