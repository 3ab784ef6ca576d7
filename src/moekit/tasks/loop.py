"""The training loop of the non-language tasks, and what a task run writes.

A task run directory holds:
    config.json           {"format", "moekit_version", "task", "model", "train", "data"}
    metrics.jsonl         the language model's record layout (train.metrics.MetricsLog):
                          {"split": "train", "step", "loss", "aux_loss", "lr", "grad_norm",
                           "examples_per_s", "dropped_fraction", "load_cv", "time",
                           "accuracy" or per-task MSE of the batch} and
                          {"split": "val", "step", "loss", "accuracy"} (or per-task MSE)
    specialisation.json   {"labels": [...], "layers": [{"name", "counts": [[per expert]
                           per label]}]}: which expert each gate ranks first, on validation
    results.json          the final validation metrics, parameters and train time
    model.safetensors     the trained weights
The optimizer (AdamW, decay on matrices only), the optimizer step (clipping, schedule, bias
updates) with its metrics record, and the progress bar are the language model trainer's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import Tensor, nn

from ..train.accumulation import global_balance, merge_stats
from ..train.config import TrainConfig
from ..train.console import progress_bar
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizer
from ..train.run import LOCAL_RUN
from ..train.rundir import new_run_config, write_run_config
from ..train.step import optimizer_step, train_record
from .data import TaskData

LossFn = Callable[[Tensor, Tensor], Tensor]


def classification_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    """Summed cross entropy and number correct (sums, so batches add up)."""
    return {
        "loss": F.cross_entropy(prediction, target, reduction="sum").item(),
        "accuracy": (prediction.argmax(dim=-1) == target).sum().item(),
    }


def regression_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    """Summed squared error per task ("task1_mse", ...) and their sum ("loss")."""
    sq_err_BT = (prediction - target).pow(2)
    per_task = {f"task{t + 1}_mse": sq_err_BT[:, t].sum().item() for t in range(target.shape[1])}
    return {"loss": sq_err_BT.sum().item()} | per_task


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Sum over tasks of each task's mean squared error (the MMoE paper's joint loss)."""
    return (prediction - target).pow(2).mean(dim=0).sum()


@dataclass
class StepOutput:
    """A task step over its micro-batches: the losses (weighted by the micro-batches' share
    of the examples), the predictions in order, the per-layer stats merged."""

    loss: Tensor
    aux_loss: Tensor
    prediction: Tensor
    stats: list


def accumulate(model: nn.Module, data: TaskData, index: Tensor, loss_fn, grad_accum: int):
    """Forward and backward of the examples `index` in grad_accum micro-batches (the
    losses are means over examples: each micro-batch weighted by its share), with the
    global balance scope counted over all of them first (train/accumulation.py)."""
    parts = [part for part in index.tensor_split(grad_accum) if len(part)]
    batches = [(data.x_train[part], data.y_train[part]) for part in parts]
    forward = lambda x, _targets: model(x)  # noqa: E731 (the counting pass's signature)
    loss = aux = torch.zeros(())
    predictions, stats = [], []
    with global_balance(model, forward, batches, LOCAL_RUN, contextlib.nullcontext):
        for x, y in batches:
            out = model(x)
            part_loss = loss_fn(out.prediction, y)
            share = len(x) / len(index)
            ((part_loss + out.aux_loss) * share).backward()
            loss = loss + part_loss.detach() * share
            aux = aux + out.aux_loss.detach() * share
            predictions.append(out.prediction.detach())
            stats.append(out.stats)
    merged = stats[0] if len(stats) == 1 else merge_stats(stats)
    return StepOutput(loss, aux, torch.cat(predictions), merged)


def shuffled_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Index batches: a fresh permutation each epoch; the last partial batch is skipped."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, num_examples)
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - size + 1, size):
            yield order[start : start + size]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, metrics_fn
) -> dict[str, float]:
    """Mean metrics over (x, y) in fixed-order batches of batch_size, in eval mode."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        for key, value in metrics_fn(out.prediction, y[start : start + batch_size]).items():
            totals[key] = totals.get(key, 0.0) + value
    model.train(was_training)
    # loss is the summed per-example loss; per-example means for everything.
    return {key: value / len(x) for key, value in totals.items()}


def train_task(
    model: nn.Module,
    data: TaskData,
    config: TrainConfig,
    run_dir: Path,
    *,
    loss_fn: LossFn,
    metrics_fn,
    show_progress: bool = True,
) -> tuple[dict[str, float], float]:
    """Train with AdamW on random batches of data's training split, evaluating on the way.

    Args:
        model: returns a TaskOutput for a batch of inputs.
        config: steps, batch_size, seed, optimizer, schedule, clipping, eval_every.
        run_dir: metrics.jsonl goes here (replaced if present).
        loss_fn: (prediction, target) -> scalar training loss.
        metrics_fn: (prediction, target) -> summed validation metrics ("loss" included).
    Returns:
        (the last validation metrics, training seconds without evaluations).
    """
    metrics = MetricsLog(run_dir)
    metrics.path.unlink(missing_ok=True)
    optimizer = build_optimizer(model, config)
    batches = shuffled_batches(len(data.x_train), config.batch_size, config.seed)

    def validate(step: int) -> dict[str, float]:
        values = evaluate(model, data.x_val, data.y_val, config.batch_size, metrics_fn)
        metrics.append({"split": "val", "step": step} | values)
        return values

    last, train_seconds = validate(0), 0.0
    with progress_bar(config.steps, 0, show_progress) as bar:
        for step in range(1, config.steps + 1):
            start = time.perf_counter()
            index = next(batches)
            out = accumulate(model, data, index, loss_fn, config.grad_accum)
            loss = out.loss
            lr, grad_norm = optimizer_step(model, optimizer, config, step - 1)
            seconds = time.perf_counter() - start
            train_seconds += seconds
            record = train_record(
                step=step,
                loss=loss.item(),
                aux_loss=out.aux_loss.item(),
                lr=lr,
                grad_norm=grad_norm,
                throughput=("examples_per_s", len(index) / seconds),
                stats=out.stats,
            )
            # The batch's accuracy (or per-task MSE), measured before this step's update.
            batch_metrics = metrics_fn(out.prediction, data.y_train[index])
            record |= {k: v / len(index) for k, v in batch_metrics.items() if k != "loss"}
            metrics.append(record)
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.3f} drop {record['dropped_fraction']:.1%}")
            if step % config.eval_every == 0 or step == config.steps:
                last = validate(step)
    return last, train_seconds


@torch.no_grad()
def specialisation(
    model: nn.Module, x: Tensor, y: Tensor, labels: list[str], batch_size: int
) -> dict:
    """Label x expert counts of each gate's first choice over (x, y), in eval mode.

    A gate choosing per token (the ViT) counts every token under its image's label.
    """
    was_training = model.training
    model.eval()
    counts: dict[str, Tensor] = {}
    for start in range(0, len(x), batch_size):
        labels_B = y[start : start + batch_size]
        for name, choice in model.gate_choices(x[start : start + batch_size]).items():
            label_of = labels_B.view(-1, *([1] * (choice.ids.dim() - 1))).expand_as(choice.ids)
            pairs = label_of.flatten() * choice.num_experts + choice.ids.flatten()
            table = torch.bincount(pairs, minlength=len(labels) * choice.num_experts)
            counts[name] = counts.get(name, 0) + table.view(len(labels), choice.num_experts)
    model.train(was_training)
    layers = [{"name": name, "counts": table.tolist()} for name, table in counts.items()]
    return {"labels": labels, "layers": layers}


@torch.no_grad()
def task_gate_usage(model: nn.Module, x: Tensor, tasks: list[str], batch_size: int) -> dict:
    """Task x expert counts for a multi-gate model: row t counts the examples whose task-t
    gate (gate_choices name "task{t+1}") weights expert e most. Same layout as
    specialisation(), with the tasks as labels."""
    was_training = model.training
    model.eval()
    table = None
    for start in range(0, len(x), batch_size):
        choices = model.gate_choices(x[start : start + batch_size])
        if not choices:
            break
        rows = [torch.bincount(choices[f"task{t + 1}"].ids, minlength=choices[f"task{t + 1}"].num_experts)
                for t in range(len(tasks))]  # fmt: skip
        table = torch.stack(rows) if table is None else table + torch.stack(rows)
    model.train(was_training)
    layers = [] if table is None else [{"name": "gates", "counts": table.tolist()}]
    return {"labels": tasks, "layers": layers}


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def start_run(run_dir: Path, task: str, model: dict, train: TrainConfig, data: dict) -> None:
    """Create the run directory and write its config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_settings = {key: getattr(train, key) for key in TRAIN_KEYS}
    config = new_run_config(task=task, model=model, train=train_settings, data=data)
    write_run_config(run_dir, config)


TRAIN_KEYS = ("steps", "batch_size", "seed", "lr", "weight_decay", "beta1", "beta2", "eps",
              "grad_clip", "warmup_steps", "min_lr_ratio", "eval_every")  # fmt: skip


def save_weights(model: nn.Module, run_dir: Path) -> None:
    """model.safetensors, written to a temporary name and renamed."""
    tmp = run_dir / "model.safetensors.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, run_dir / "model.safetensors")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
