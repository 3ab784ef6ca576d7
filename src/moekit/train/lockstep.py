"""Trainers trained in lockstep, segment by segment, with one printed line per evaluation.

A comparison times its two models under the same machine conditions by alternating them
every eval_every steps (MoE segment, dense segment, MoE segment, ...) instead of training
one to the end and then the other: drift of the machine (other jobs, thermal limits)
between two long runs moved the tokens/s ratio by 5-10%. Each trainer keeps its own
loader and its own torch RNG stream (Trainer.own_rng), so each ends with exactly the
weights and losses it would get trained alone (tests/test_train_lockstep.py).

After each segment boundary, once every trainer has reached it, one line goes to stdout:

    step  50/225  val loss  MoE 5.759  dense 5.945  (-0.186)  tok/s  MoE 12,104  dense 12,577
    step  50/225  val loss 5.759  tok/s 12,104                        (one trainer)

The gap in parentheses is the first model's loss minus the second's (negative: the first
is ahead); tokens/s are each model's over the segment that just ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import TrainConfig
from .console import print_line
from .trainer import Trainer, TrainResult

# How the lines name the runs of a comparison.
DISPLAY_NAMES = {"moe": "MoE", "dense": "dense"}


def segment_ends(config: TrainConfig) -> list[int]:
    """The steps at which segments end: every eval_every steps, and the last step."""
    ends = list(range(config.eval_every, config.steps, config.eval_every))
    return ends + [config.steps]


def train_in_lockstep(
    trainers: dict[str, Trainer], log: Callable[[str], None] = print_line
) -> dict[str, TrainResult]:
    """Train the trainers alternately, one segment each in turn, to their common end.

    All trainers share one TrainConfig's steps and eval_every. A trainer resumed past a
    boundary skips the segments it has done. Ctrl-C: the trainer in its segment saves at
    the end of its current step, the others save where they stand, then KeyboardInterrupt
    is raised; a resume continues both (bit-identical to an uninterrupted job).

    Args:
        trainers: {name: Trainer}, trained in this order within each segment.
        log: where the per-evaluation lines go (rank 0 only).
    Returns:
        {name: TrainResult}, after each trainer's finish() (its last checkpoint).
    """
    config = next(iter(trainers.values())).config
    main = all(trainer.is_main for trainer in trainers.values())
    start = min(trainer.step for trainer in trainers.values())
    try:
        for trainer in trainers.values():
            trainer.train_until(0)  # the step-0 evaluation of a fresh run
        if start == 0 and main:
            log(eval_line(trainers, 0, 0))
        previous = 0
        for end in segment_ends(config):
            if end > start:
                for trainer in trainers.values():
                    trainer.train_until(end)
                if main:
                    log(eval_line(trainers, previous, end))
            previous = end
    except KeyboardInterrupt:
        for trainer in trainers.values():  # every run stops at a consistent checkpoint
            trainer.ensure_saved()
            trainer.close_progress()
        raise
    return {name: trainer.finish() for name, trainer in trainers.items()}


def eval_line(trainers: dict[str, Trainer], start: int, end: int) -> str:
    """The line for the evaluation at `end`, with tokens/s over steps start+1..end."""
    steps = next(iter(trainers.values())).config.steps
    line = f"step {end:>{len(str(steps))}}/{steps}  val loss"
    losses = {name: trainer.val_losses[end] for name, trainer in trainers.items()}
    speeds = {name: tokens_per_s(trainer, start, end) for name, trainer in trainers.items()}
    if len(trainers) == 1:
        (loss,), (speed,) = losses.values(), speeds.values()
        line += f" {loss:.3f}"
        return line + (f"  tok/s {speed:,.0f}" if end > start else "")
    for name, loss in losses.items():
        line += f"  {DISPLAY_NAMES.get(name, name)} {loss:.3f}"
    if len(losses) == 2:
        first, second = losses.values()
        line += f"  ({first - second:+.3f})"
    if end > start:
        line += "  tok/s"
        for name, speed in speeds.items():
            line += f"  {DISPLAY_NAMES.get(name, name)} {speed:,.0f}"
    return line


def tokens_per_s(trainer: Trainer, start: int, end: int) -> float:
    """A trainer's training tokens/s over steps start+1..end (from its step times)."""
    seconds = sum(trainer.step_seconds[start:end])
    tokens = (end - start) * trainer.config.batch_size * trainer.config.seq_len
    return tokens / seconds if seconds > 0 else math.nan
