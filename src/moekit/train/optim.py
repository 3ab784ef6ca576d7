"""The optimizer of every trainer in moekit: AdamW over the trainable parameters."""

from __future__ import annotations

from fnmatch import fnmatch

import torch

from .config import TrainConfig, trainable_patterns


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and expert weights (ndim >= 2) only.

    Norm gains and biases are not decayed: shrinking them towards 0 is not a prior anyone
    wants (nanoGPT, LLaMA recipes). The learning rate is set every step by the schedule.
    fused=True: one kernel per parameter group instead of a chain of foreach ops; on CPU
    the step over the tiny MoE's 4 M parameters drops from about 23 ms to 4 ms.
    With config.trainable set, the other parameters are frozen (requires_grad False).
    """
    params = _trainable(model, config.trainable)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Sharded (DTensor) parameters take the plain per-parameter loop.
    fused = not any(hasattr(p, "device_mesh") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
        foreach=None if fused else False,
    )


def _trainable(model: torch.nn.Module, trainable: str | None) -> list[torch.nn.Parameter]:
    """The parameters matching the trainable patterns (all when None); freezes the rest."""
    if trainable is None:
        return list(model.parameters())
    patterns = trainable_patterns(trainable)
    unmatched = [p for p in patterns if not any(fnmatch(n, p) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"trainable patterns {unmatched} match no parameter of the model")
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch(name, p) for p in patterns))
        if param.requires_grad:
            params.append(param)
    return params
