"""SHA-256 of checkpoint files: recorded in trainer_state.json, checked before loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel import ParallelMesh

SHARD_SUFFIX = ".safetensors"


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    return _digest(path).hex()


def shard_hashes(folder: str | Path, mesh: ParallelMesh | None) -> dict[str, str]:
    """The SHA-256 of every shard file in folder, on every rank (collective): each rank
    hashes every W-th file, so no rank reads the whole checkpoint."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(SHARD_SUFFIX))
    rank, world = (0, 1) if mesh is None else (mesh.rank, mesh.world_size)
    digests = torch.zeros(len(names), 32, dtype=torch.int64)
    for i in range(rank, len(names), world):
        digests[i] = torch.tensor(list(_digest(Path(folder) / names[i])))
    if mesh is not None:
        digests = digests.to(mesh.device)
        dist.all_reduce(digests, group=mesh.world_group)  # one rank filled each row
    return {name: bytes(row.tolist()).hex() for name, row in zip(names, digests.cpu())}


def _digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()
