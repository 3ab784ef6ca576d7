"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup rises linearly to lr over warmup_steps (step 0 already gets lr / warmup_steps,
    so no step is wasted at zero); the cosine then falls from lr to min_lr_ratio * lr,
    reached at the last step (steps - 1).

    Args:
        step: the step about to be taken, in [0, steps).
        lr: the peak learning rate.
        steps: total optimizer steps of the run.
        warmup_steps: steps of linear warmup.
        min_lr_ratio: the final learning rate as a fraction of lr.
    Returns:
        The learning rate.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min_lr_ratio * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
