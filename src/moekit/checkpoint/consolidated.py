"""The consolidated layout: the whole model and its AdamW state as one process has them.

model.safetensors      the weights (tied embeddings stored once)
optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..files import fsync_file
from .folder import MODEL_FILE, OPTIMIZER_FILE, commit, fresh_tmp
from .hashing import sha256_file


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.Tensor],
    state: dict,
) -> Path:
    """Write model, optimizer and trainer state atomically into run_dir/checkpoint/.

    Args:
        run_dir: the run directory.
        model: the model; its state_dict goes to model.safetensors.
        optimizer: an optimizer over model's named parameters (AdamW-style state), or its
            tensors as optimizer_tensors() gives them (expert parallelism gathers them first).
        state: JSON-ready trainer state (step, loader, config, ...); format, versions,
            RNG state and file hashes are added here.
    Returns:
        The checkpoint folder.
    """
    tmp = fresh_tmp(run_dir)
    save_model(model, str(tmp / MODEL_FILE))
    if not isinstance(optimizer, dict):
        optimizer = optimizer_tensors(model, optimizer)
    save_file(optimizer, str(tmp / OPTIMIZER_FILE))
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        fsync_file(tmp / name)  # on disk before the rename makes them the checkpoint
    hashes = {name: sha256_file(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE)}
    return commit(run_dir, tmp, state, hashes, "consolidated")


def read_consolidated(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """Load a verified consolidated folder's weights (and AdamW state) into one process."""
    load_model(model, str(folder / MODEL_FILE), strict=True)
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, read_optimizer_file(folder))


def read_optimizer_file(folder: Path) -> dict[str, torch.Tensor]:
    """optimizer.safetensors of a consolidated folder, as optimizer_tensors() wrote it."""
    return load_file(str(folder / OPTIMIZER_FILE))


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors: "{param name}.{exp_avg|exp_avg_sq|step}"."""
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict
) -> None:
    """Inverse of optimizer_tensors: restore each parameter's state by name."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = value
    names = [name for name, _ in model.named_parameters()]
    unknown = sorted(set(by_param) - set(names))
    if unknown:
        raise KeyError(f"optimizer state for unknown parameters {unknown[:3]}")
    saved = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    params = dict(model.named_parameters())
    saved["state"] = {index[id(params[name])]: fields for name, fields in by_param.items()}
    optimizer.load_state_dict(saved)
