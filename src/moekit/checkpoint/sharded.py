"""The sharded layout: torch.distributed.checkpoint (DCP) shards, every rank its own, in
one-process coordinates, so any layout reads them back.

    shards/shard-NNNNN-model-00001-of-00001.safetensors
                           what rank NNNNN - 1 wrote: its chunks of the weights and AdamW
                           state in one-process coordinates (DCP's safetensors storage)

Keys are "model.{parameter or persistent buffer}" (tied weights once, under their first
name) and "optimizer.{parameter}.{exp_avg|exp_avg_sq|step}", the names a one-process
model has; parallel/global_view.py turns each rank's tensors into DTensors of those
one-process shapes. Reading plans each rank's own chunks from the saved offsets, so a
checkpoint written at FSDP x EP 2 on 4 processes loads at EP 1 x DP 2, at EP 4, or into a
plain one-process model.

Storage: DCP's Hugging Face safetensors storage (one file per writing rank, each tensor
chunk's offsets kept as JSON in the file's header). Its reader rebuilds the checkpoint's
metadata from those headers, so loading unpickles nothing; DCP's default FileSystemWriter
would instead pickle a `.metadata` file. (DCP's save and load do exchange their plans
between the ranks as pickled objects over the process group: only between the job's own
processes, never from a file.)
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..parallel import ParallelMesh
from ..parallel.fsdp import reshard
from ..parallel.global_view import GlobalView
from .folder import CHECKPOINT_DIR, SHARDS_DIR, barrier, commit, fresh_tmp, tmp_dir
from .hashing import shard_hashes

MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."


def save_sharded_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    mesh: ParallelMesh | None,
) -> Path:
    """Write the sharded layout atomically (collective over the mesh: every rank writes
    its own shards; rank 0 then writes trainer_state.json and renames the folder).

    Args: as save_checkpoint; mesh: the ranks (None: this process alone).
    Returns:
        The checkpoint folder.
    """
    main = mesh is None or mesh.rank == 0
    tmp = tmp_dir(run_dir)
    if main:
        fresh_tmp(run_dir)
    barrier(mesh)  # nobody writes into the folder before rank 0 has emptied it
    write_shards(tmp / SHARDS_DIR, model, optimizer, mesh)  # each rank's files fsynced
    hashes = {f"{SHARDS_DIR}/{n}": h for n, h in shard_hashes(tmp / SHARDS_DIR, mesh).items()}
    if main:
        commit(run_dir, tmp, state, hashes, "sharded")
    barrier(mesh)  # nobody reads the folder while rank 0 swaps it
    return Path(run_dir) / CHECKPOINT_DIR


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters (tied ones once, under their first name) and persistent buffers."""
    named = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                named[f"{module_name}.{name}" if module_name else name] = buffer
    return named


def shard_state(model: nn.Module, optimizer, mesh: ParallelMesh | None) -> dict[str, Tensor]:
    """The tensors a save writes (module docstring), aliasing this rank's storage."""
    view = GlobalView(model, mesh)
    state = {MODEL_PREFIX + n: view(n, t) for n, t in _named_tensors(model).items()}
    if optimizer is not None:
        for name, param in model.named_parameters():
            for field, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor):
                    state[f"{OPTIMIZER_PREFIX}{name}.{field}"] = view(name, value)
    return state


def write_shards(folder: str | Path, model: nn.Module, optimizer, mesh: ParallelMesh | None):
    """Every rank writes its shards of the weights and AdamW state into folder (collective
    over the mesh's world; mesh None: this process alone writes everything)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    reshard(model)  # after an evaluation an FSDP root holds its gathered weights
    with _quiet():
        dcp.save(
            shard_state(model, optimizer, mesh),
            storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
            process_group=None if mesh is None else mesh.world_group,
            no_dist=mesh is None,
        )


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes one process when no process group exists: that is what
    mesh None asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def saved_keys(folder: str | Path) -> dict[str, torch.Size]:
    """Each saved tensor's key and one-process shape, read from the shard files' headers."""
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata()
    return {key: md.size for key, md in metadata.state_dict_metadata.items()}


@torch.no_grad()
def read_shards(folder: str | Path, model: nn.Module, optimizer, mesh: ParallelMesh | None) -> None:
    """Load this rank's part of every weight (and AdamW moment, with an optimizer) from
    folder, whatever layout wrote it (collective over the mesh's world, like the save).

    Raises:
        KeyError: the checkpoint's keys differ from this model's (missing or unknown names).
        ValueError: a saved tensor's shape differs from this model's.
    """
    reshard(model)  # FSDP: write into the shards, never into gathered buffers
    saved = saved_keys(folder)
    view = GlobalView(model, mesh)
    targets = {MODEL_PREFIX + n: view(n, t) for n, t in _named_tensors(model).items()}
    model_keys = {k for k in saved if k.startswith(MODEL_PREFIX)}
    if model_keys != set(targets):
        missing, unknown = sorted(set(targets) - model_keys), sorted(model_keys - set(targets))
        raise KeyError(f"checkpoint tensors differ from the model's: missing {missing[:3]}, "
                       f"unknown {unknown[:3]}")  # fmt: skip
    moments = _moment_targets(model, optimizer, saved, view, targets)
    for key, target in targets.items():
        if tuple(target.shape) != tuple(saved[key]):
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(saved[key])}, "
                f"the model's {tuple(target.shape)}"
            )
    with _quiet():
        dcp.load(
            targets,
            storage_reader=HuggingFaceStorageReader(str(folder)),
            process_group=None if mesh is None else mesh.world_group,
            no_dist=mesh is None,
        )
    if optimizer is not None:
        optimizer.state.clear()
        for (param, field), value in moments.items():
            optimizer.state[param][field] = value


def _moment_targets(
    model: nn.Module, optimizer, saved: dict, view: GlobalView, targets: dict
) -> dict[tuple[nn.Parameter, str], Tensor]:
    """Fresh tensors for the saved AdamW state (added to targets in DCP's coordinates)."""
    moments: dict[tuple[nn.Parameter, str], Tensor] = {}
    if optimizer is None:
        return moments
    params = dict(model.named_parameters())
    for key, shape in saved.items():
        if not key.startswith(OPTIMIZER_PREFIX):
            continue
        name, field = key[len(OPTIMIZER_PREFIX) :].rsplit(".", 1)
        if name not in params:
            raise KeyError(f"optimizer state for unknown parameter {name!r}")
        param = params[name]
        # Laid out like the parameter (moments) or whole on every rank (step counts).
        value = torch.zeros_like(param) if len(shape) else torch.zeros(())
        moments[param, field] = value
        targets[key] = view(name, value)
    return moments
