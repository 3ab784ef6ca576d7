"""The validation loss: one definition for training, `moekit eval` and the reports.

The mean next-token cross entropy over the target tokens of fixed batches of windows
spread evenly over the validation split (RunData.eval_windows), in eval mode, under the
run's dtype (autocast) and never compiled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import Transformer
from .config import TrainConfig
from .data import RunData


def autocast(dtype: str):
    """The autocast context of TrainConfig.dtype: bfloat16 matmuls, or none for float32."""
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def fixed_eval_batches(data: RunData, config: TrainConfig) -> list[tuple[Tensor, Tensor]]:
    """The (inputs_BL, targets_BL) batches every evaluation uses (RunData.eval_windows)."""
    return [batch[:2] for batch in data.eval_windows(config)]


def fixed_eval_domains(data: RunData, config: TrainConfig) -> list[Tensor]:
    """The (B, L) domain ids of the target tokens of fixed_eval_batches."""
    return [domains_BL for *_, domains_BL in data.eval_windows(config)]


@torch.no_grad()
def evaluate(model: Transformer, batches, observe=None) -> float:
    """Mean next-token cross entropy over the batches' target tokens (aux losses excluded).

    Args:
        model: the model; put in eval mode for the call and restored afterwards.
        batches: iterable of (inputs_BL, targets_BL).
        observe: None, or observe(i, output) called with batch i's ModelOutput, which then
            carries expert_ids (routing statistics).
    Returns:
        The loss in nats per token.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (inputs_BL, targets_BL) in enumerate(batches):
        out = model(inputs_BL, targets_BL, return_expert_ids=observe is not None)
        if observe is not None:
            observe(i, out)
        # Weighted by the tokens the loss counts (fine-tuning ignores prompts and padding).
        num_targets = int((targets_BL != -100).sum())
        if num_targets:
            total += out.loss.item() * num_targets
            count += num_targets
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches: the validation split is shorter than one sequence")
    return total / count
