"""Evaluate a trained `vit` run at other capacity factors and claim orders.

V-MoE (Riquelme et al. 2021) reduces capacity at inference time on a model
trained with more: batch priority routing drops the tokens the router is least sure of,
position order drops the last images' tokens. This module rebuilds a vit run's model from
its config.json and model.safetensors, changes only the MoE layers' capacity settings,
and measures validation accuracy and the dropped fraction.

    rows = capacity_sweep("runs/vit-dropless", [0.25, 0.5, 1.0])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model

from ..config import MoEConfig
from ..models.vit import ViTConfig, ViTMoE
from . import data as task_data


def load_vit_run(
    run_dir: str | Path, *, capacity_factor: float | None, batch_priority: bool
) -> ViTMoE:
    """The run's trained ViT with its MoE layers set to the given capacity and claim order."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("task") != "vit" or config["model"]["name"] != "moe":
        raise ValueError(f"{str(run_dir)!r} is not a vit run with MoE layers")
    m = config["model"]
    if m["router"] == "soft":
        raise ValueError("a Soft MoE run has no capacity to change")
    moe = MoEConfig(
        d_model=m["d_model"], d_hidden=m["mlp_hidden"], num_experts=m["num_experts"],
        top_k=m["top_k"], router=m["router"], activation="gelu",
        capacity_factor=capacity_factor, batch_priority=batch_priority and capacity_factor is not None,
    )  # fmt: skip
    vit = ViTConfig(
        image_size=m["image_size"], patch_size=m["patch_size"], num_classes=10,
        d_model=m["d_model"], num_layers=m["num_layers"], num_heads=m["num_heads"],
        mlp_hidden=m["mlp_hidden"], moe=moe, moe_every=m["moe_every"],
    )  # fmt: skip
    model = ViTMoE(vit)
    load_model(model, str(run_dir / "model.safetensors"))
    return model.eval()


@torch.no_grad()
def capacity_sweep(run_dir: str | Path, factors: list[float], batch_size: int = 64) -> list[dict]:
    """Validation accuracy and dropped fraction for each factor x {batch, position} order.

    The validation split is rebuilt from the run's data source and seed; batches of
    batch_size in a fixed order, as in training.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    seed = config["train"]["seed"]
    if config["data"]["source"] == "mnist":
        data = task_data.load_mnist_5k(seed=seed)
    else:
        data = task_data.load_digits_data(images=True, seed=seed)
    rows = []
    for factor in factors:
        for priority in ("batch", "position"):
            model = load_vit_run(
                run_dir, capacity_factor=factor, batch_priority=priority == "batch"
            )
            correct, dropped = 0, []
            for start in range(0, len(data.x_val), batch_size):
                out = model(data.x_val[start : start + batch_size])
                correct += (
                    (out.prediction.argmax(-1) == data.y_val[start : start + batch_size])
                    .sum()
                    .item()
                )
                dropped += [s.dropped_fraction.item() for s in out.stats]
            rows.append({
                "capacity_factor": factor,
                "priority": priority,
                "accuracy": correct / len(data.x_val),
                "dropped_fraction": sum(dropped) / len(dropped),
            })  # fmt: skip
    return rows
