"""Sharded checkpoint tensors with torch.distributed.checkpoint (DCP): every rank writes
its own shards, in the one-process coordinates, so any layout reads them back.

    write_shards(folder, model, optimizer, mesh)   # collective; mesh None: one process
    read_shards(folder, model, optimizer, mesh)

Keys are "model.{parameter or persistent buffer}" (tied weights once, under their first
name) and "optimizer.{parameter}.{exp_avg|exp_avg_sq|step}", the names a one-process
model has. Each rank hands DCP its tensors as DTensors whose global shape is the
one-process shape:
- FSDP-sharded weights and moments are already such DTensors (dim 0 split over the world);
- an expert-parallel rank's experts (E/ep, ...) become rows [ep_rank * E/ep, ...) of the
  global (E, ...) tensor: a DTensor on the (ep, dp) mesh with placements (Shard(0),
  Shard(0)) under FSDP (the EP slice, then FSDP's chunk of it over the DP group) or
  (Shard(0), Replicate()) without it (the DP replicas hold the same rows);
- a tensor every rank holds whole (replicated weights, buffers, step counts) is passed as
  it is, and DCP has one rank write it.
Reading plans each rank's own chunks from the saved offsets, so a checkpoint written at
FSDP x EP 2 on 4 processes loads at EP 1 x DP 2, at EP 4, or into a plain one-process model.
(torch's get_state_dict / set_state_dict would hand DCP the expert DTensors as FSDP sees
them, on the DP group with the EP slice's shape (E/ep, ...) as their global shape: every EP
rank would write different rows under the same key and offsets. Hence this mapping.)

Storage: DCP's Hugging Face safetensors storage (one `shard-NNNNN-model-00001-of-00001.
safetensors` per writing rank, each tensor chunk's offsets kept as JSON in the file's
header). Its reader rebuilds the checkpoint's metadata from those headers, so loading
unpickles nothing; DCP's default FileSystemWriter would instead pickle a `.metadata` file.
(DCP's save and load do exchange their plans between the ranks as pickled objects over
the process group: only between the job's own processes, never from a file.)
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .all_to_all import ExpertParallelExperts
from .mesh import ParallelMesh

MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."
SHARD_SUFFIX = ".safetensors"


def _experts(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {
        f"{name}.{param}": module
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for param in module.sharded_names
    }


def _ep_dp_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """The world as an (ep, dp) DeviceMesh over the mesh's own groups: rank d * ep + e at
    (e, d), so Shard(0) on dim 0 then on dim 1 is the EP slice, then its DP chunk."""
    ranks = torch.arange(mesh.world_size).view(mesh.dp, mesh.ep).t()
    return DeviceMesh.from_group(
        [mesh.ep_group, mesh.dp_group], mesh.device.type, ranks, mesh_dim_names=("ep", "dp")
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


class _GlobalView:
    """Turns this rank's tensors into the one-process coordinates DCP stores."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh | None):
        self.owners = _experts(model)
        self.ep_dp = _ep_dp_mesh(mesh) if mesh is not None and self.owners else None

    def __call__(self, name: str, t: Tensor) -> Tensor:
        """t: the parameter `name`, or a tensor laid out like it (an AdamW moment)."""
        owner = self.owners.get(name)
        if owner is None or t.dim() == 0:
            return t.detach()  # whole on every rank, or already a world-sharded DTensor
        local = (t.to_local() if isinstance(t, DTensor) else t).detach()
        placements = (Shard(0), Shard(0) if isinstance(t, DTensor) else Replicate())
        shape = (owner.num_global_experts, *t.shape[1:])
        return DTensor.from_local(
            local,
            self.ep_dp,
            placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_stride(shape),
        )


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
    view = _GlobalView(model, mesh)
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
    saved = saved_keys(folder)
    view = _GlobalView(model, mesh)
    tensors = _named_tensors(model)
    targets = {MODEL_PREFIX + n: view(n, t) for n, t in tensors.items()}
    model_keys = {k for k in saved if k.startswith(MODEL_PREFIX)}
    if model_keys != set(targets):
        missing, unknown = sorted(set(targets) - model_keys), sorted(model_keys - set(targets))
        raise KeyError(f"checkpoint tensors differ from the model's: missing {missing[:3]}, "
                       f"unknown {unknown[:3]}")  # fmt: skip
    moments: dict[tuple[nn.Parameter, str], Tensor] = {}
    if optimizer is not None:
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


def file_hashes(folder: str | Path, mesh: ParallelMesh | None) -> dict[str, str]:
    """The SHA-256 of every shard file in folder, on every rank (collective): each rank
    hashes every W-th file, so no rank reads the whole checkpoint."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(SHARD_SUFFIX))
    rank, world = (0, 1) if mesh is None else (mesh.rank, mesh.world_size)
    digests = torch.zeros(len(names), 32, dtype=torch.int64)
    for i in range(rank, len(names), world):
        digests[i] = torch.tensor(list(sha256_file(Path(folder) / names[i])))
    if mesh is not None:
        digests = digests.to(mesh.device)
        dist.all_reduce(digests, group=mesh.world_group)  # one rank filled each row
    return {name: bytes(row.tolist()).hex() for name, row in zip(names, digests.cpu())}


def sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()
