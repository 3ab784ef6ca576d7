"""One optimizer step and its metrics record, shared by the language-model Trainer and the
task loop (tasks/loop.py): after the backward, the same six things in the same order.

    lr, grad_norm = optimizer_step(model, optimizer, config, steps_done, run)
    record = train_record(step=..., loss=..., ..., stats=out.stats)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..moe import update_router_biases
from .config import TrainConfig
from .run import LOCAL_RUN, Run
from .schedule import lr_at


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    steps_done: int,
    run: Run = LOCAL_RUN,
    skip: Callable[[float], bool] | None = None,
) -> tuple[float, float]:
    """Clip, set the scheduled learning rate, step, zero the gradients, update router biases.

    Args:
        model: the model whose gradients the backward just filled.
        optimizer: its optimizer (the learning rate is set here, every step).
        config: grad_clip and the schedule (lr, steps, warmup_steps, min_lr_ratio).
        steps_done: optimizer steps taken before this one (the schedule's position).
        run: where the gradients are reduced across ranks before the clip.
        skip: skip(grad_norm) -> True drops the step (no update, gradients zeroed): the
            trainer's guard against non-finite steps (train/health.py), which may raise.
    Returns:
        (the learning rate used, the gradient norm before clipping).
    """
    grad_norm = run.reduce_and_clip(model, config.grad_clip)
    lr = lr_at(
        steps_done,
        lr=config.lr,
        steps=config.steps,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio,
    )
    if skip is not None and skip(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_router_biases(model)  # DeepSeek-V3 bias balancing, outside autograd
    return lr, grad_norm


def train_record(
    *,
    step: int,
    loss: float,
    aux_loss: float,
    lr: float,
    grad_norm: float,
    throughput: tuple[str, float],
    stats: list,
) -> dict:
    """The metrics.jsonl record of a training step (train/metrics.py has the layout).

    Args:
        throughput: (name, value), e.g. ("tokens_per_s", 51234.0).
        stats: the step's per-layer MoEStats (None for dense layers).
    """
    moe_stats = [s for s in stats if s is not None]
    name, value = throughput
    return {
        "split": "train",
        "step": step,
        "loss": loss,
        "aux_loss": aux_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        name: value,
        "dropped_fraction": _mean([s.dropped_fraction for s in moe_stats]),
        "load_cv": _mean([s.load_cv for s in moe_stats]),
        "time": time.time(),
    }


def _mean(values: list[Tensor]) -> float:
    return torch.stack(values).float().mean().item() if values else 0.0
