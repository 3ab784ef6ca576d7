"""Gradient accumulation: one optimizer step over grad_accum micro-batches, and the global
balance scope that counts the routing of the whole step.

    micro = micro_batches((inputs_BL, targets_BL), config.grad_accum)
    step = forward_backward(forward, model, micro, run, autocast)   # gradients accumulated
    optimizer_step(...)

`TrainConfig.batch_size` is the step's batch (over all ranks); each rank's rows are split
into grad_accum equal micro-batches, so grad_accum changes the memory a step needs, not
what it computes, wherever the math allows (docs/train.md, "Gradient accumulation"):
- the task loss of micro-batch i is weighted by its share of the rank's counted targets
  (n_i / n, targets of -100 not counted), so the weighted sum is the mean over the rank's
  rows; the MoE aux losses (means over every routed token, padding included: all
  micro-batches have the same tokens) by 1 / grad_accum.
- dropless token choice: equal to one pass over the rank's rows up to float rounding.
- capacity is per forward (C = cf * T * K / E of the micro-batch's T tokens), and expert
  choice picks each expert's top-C among the micro-batch's tokens: which tokens drop, or
  which an expert takes, is decided per micro-batch, as it would be for any forward of
  that size. Batch priority ranks tokens within the micro-batch. Routers that draw noise
  (noisy_topk, switch jitter, gshard's second expert) draw it per micro-batch: the same
  distribution, other samples.
- the micro_batch balance scope is per forward, so per micro-batch; the sequence scope
  is per sequence (unchanged); the global scope is exact (below).

Global scope (MoEConfig.balance_scope "global"; losses.py, "Scopes"): before the step's
first backward, `count_step_routing` runs every micro-batch once more without gradients
(the same RNG draws: the state is restored afterwards), each global-scope layer summing
its balance_sums; one all-reduce adds the ranks' sums; each layer then balances against
the means of the whole step. Cost: one forward without activations kept per step (about
a third of a training step), no extra memory beyond the (4, E) sums per layer, one
all-reduce of 4 * E + 1 floats per layer. It runs only where it changes something: with
more than one micro-batch or more than one rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import losses
from ..moe import MoE

IGNORE = -100  # targets the cross entropy skips


@dataclass
class StepLosses:
    """The detached losses of one optimizer step over its micro-batches (this rank's):
    loss and mtp_loss weighted by the micro-batches' target shares, aux_loss their mean;
    stats per layer, merged over the micro-batches (None for dense layers)."""

    loss: Tensor
    aux_loss: Tensor
    mtp_loss: Tensor
    stats: list


def micro_batches(tensors: Sequence[Tensor], grad_accum: int) -> list[tuple[Tensor, ...]]:
    """The rows of `tensors` (same first dimension) in grad_accum equal, contiguous parts."""
    rows = tensors[0].shape[0]
    if grad_accum < 1 or rows % grad_accum:
        raise ValueError(
            f"grad_accum ({grad_accum}) must divide this process's rows of the batch ({rows}); "
            "batch_size must be divisible by grad_accum times the number of processes"
        )
    size = rows // grad_accum
    return list(zip(*(t.split(size) for t in tensors), strict=True))


def target_shares(targets: Sequence[Tensor]) -> list[Tensor]:
    """Each micro-batch's share of the counted targets (not IGNORE): weights summing to 1."""
    counts = torch.stack([(t != IGNORE).sum() for t in targets]).float()
    return list(counts / counts.sum().clamp_min(1.0))


def forward_backward(
    forward: Callable,
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    run,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> StepLosses:
    """Forward and backward over the step's micro-batches, gradients accumulated in .grad.

    Args:
        forward: the training forward, forward(inputs_BL, targets_BL) -> ModelOutput.
        model: the model (its MoE layers; the global scope's counting pass).
        batches: the micro-batches, (inputs_BL, targets_BL) each.
        run: the Run (collectives; the gradient reduction waits for the last backward).
        autocast: the training autocast context.
    """
    if len(batches) == 1:  # the step is one forward: exactly the plain step
        (inputs_BL, targets_BL) = batches[0]
        with global_balance(model, forward, batches, run, autocast):
            with autocast():
                out = forward(inputs_BL, targets_BL)
            (out.loss + out.aux_loss + out.mtp_loss).backward()
        return StepLosses(
            out.loss.detach(), out.aux_loss.detach(), out.mtp_loss.detach(), out.stats
        )
    shares = target_shares([targets_BL for _, targets_BL in batches])
    last = len(batches) - 1
    parts, per_batch_stats = [], []
    with global_balance(model, forward, batches, run, autocast):
        for i, ((inputs_BL, targets_BL), share) in enumerate(zip(batches, shares, strict=True)):
            sync = run.no_sync() if i < last else contextlib.nullcontext()
            with sync:
                with autocast():
                    out = forward(inputs_BL, targets_BL)
                share = share.to(out.loss.device)
                ((out.loss + out.mtp_loss) * share + out.aux_loss / len(batches)).backward()
            weighted = (out.loss * share, out.aux_loss / len(batches), out.mtp_loss * share)
            parts.append(torch.stack(weighted).detach().float())
            per_batch_stats.append(out.stats)
    loss, aux_loss, mtp_loss = torch.stack(parts).sum(dim=0)
    return StepLosses(loss, aux_loss, mtp_loss, merge_stats(per_batch_stats))


def merge_stats(per_batch: list[list]) -> list:
    """Per layer, the MoEStats of a step's micro-batches as one: expert counts summed and
    the load CV recomputed from them; the other figures averaged."""
    merged = []
    for layer in zip(*per_batch, strict=True):
        if layer[0] is None:
            merged.append(None)
            continue
        counts_E = torch.stack([s.tokens_per_expert for s in layer]).sum(dim=0)

        def mean(name: str, layer=layer) -> Tensor:
            return torch.stack([getattr(s, name).float() for s in layer]).mean()

        merged.append(
            dataclasses.replace(
                layer[0],
                tokens_per_expert=counts_E,
                load_cv=losses.cv_squared(counts_E.float()).sqrt(),
                **{
                    name: mean(name)
                    for name in (
                        "dropped_fraction",
                        "router_entropy",
                        "balance_loss",
                        "z_loss",
                        "importance_loss",
                        "load_loss",
                    )
                },
            )
        )
    return merged


def global_scope_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers whose balance_scope is global."""
    return [m for m in model.modules() if isinstance(m, MoE) and m.config.balance_scope == "global"]


@contextlib.contextmanager
def global_balance(model: nn.Module, forward: Callable, batches, run, autocast):
    """Within the block, the global-scope layers balance against the whole step's routing
    (counted first by count_step_routing), when the step has more than one micro-batch or
    rank; otherwise the block's one forward is the step and nothing is counted."""
    layers = global_scope_layers(model)
    if not layers or (len(batches) == 1 and run.world_size == 1):
        yield
        return
    count_step_routing(layers, model, forward, batches, run, autocast)
    for layer in layers:
        layer.balance_reference_on = True
    try:
        yield
    finally:
        for layer in layers:
            layer.balance_reference_on = False


@torch.no_grad()
def count_step_routing(layers: list[MoE], model: nn.Module, forward, batches, run, autocast):
    """Run the step's micro-batches without gradients, summing each global-scope layer's
    balance_sums over them and over the ranks into its balance_reference (the means).

    The forwards draw what the training forwards will draw (router noise, dropout: the RNG
    state is restored afterwards), and every router buffer they update (the sigmoid
    router's load count) is put back, so the pass leaves no trace but the references.
    """
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    saved = [buffer.clone() for router in routers for buffer in router.buffers()]
    devices = [batches[0][0].device] if batches[0][0].device.type == "cuda" else []
    for layer in layers:
        layer.balance_totals.zero_()
        layer.balance_tokens.zero_()
        layer.counting_balance = True
    try:
        with torch.random.fork_rng(devices=devices), autocast():
            for inputs_BL, targets_BL in batches:
                forward(inputs_BL, targets_BL)
    finally:
        for layer in layers:
            layer.counting_balance = False
        buffers = [buffer for router in routers for buffer in router.buffers()]
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
    flat = torch.cat(
        [torch.cat([m.balance_totals.flatten(), m.balance_tokens[None]]) for m in layers]
    )
    flat = run.sum(flat)
    for layer, part in zip(layers, flat.split([m.balance_totals.numel() + 1 for m in layers])):
        totals_4E, tokens = part[:-1].view_as(layer.balance_totals), part[-1]
        layer.balance_reference.copy_(losses.global_means(totals_4E, tokens))
