"""Gradient all-reduce overlapped with the backward, in buckets (DistributedRun's path).

sync_gradients (apply.py) reduces every gradient after the whole backward. BucketedReducer
gives the same result (the sum over the group, divided by the world size; replicated
weights over the world group, expert shards over their data-parallel group) but starts
each bucket's all-reduce as soon as the backward has accumulated the last gradient in it
(`register_post_accumulate_grad_hook`), so the communication of the late layers runs
while the backward still computes the early ones.

    reducer = BucketedReducer(model, mesh)   # hooks on every trained parameter
    loss.backward()                          # buckets start during the backward
    reducer.finish()                         # wait; grads now averaged; then clip and step

Under gradient accumulation the backwards of all micro-batches but the last run inside
`reducer.paused()`: they only accumulate, and the last one's hooks start the buckets.

Buckets hold parameters in reverse registration order (the order the backward reaches
them), up to bucket_mib each, per group. Every rank starts a group's buckets strictly in
bucket order, so all ranks issue the same collectives in the same order even when a
parameter gets no gradient on some rank (an expert that received no rows): such a bucket,
and the ones after it, start in finish() instead, the missing gradient counting as zeros.
A final small all-reduce of "had a gradient" flags leaves the gradient None where no rank
had one, exactly as sync_gradients does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .apply import expert_parameters
from .mesh import ParallelMesh


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.all_params = params
        self.ready: set[int] = set()
        self.flat: Tensor | None = None
        self.work = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The bucket's trained parameters (the optimizer may freeze some after the hooks
        are set; the flags are the same on every rank)."""
        return [p for p in self.all_params if p.requires_grad]


class _Group:
    """The buckets of one process group, started in order."""

    def __init__(self, params: list[nn.Parameter], group, cap_bytes: int):
        self.group, self.buckets, self.started = group, [], 0
        current, size = [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * 4
            if size >= cap_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))

    def start_ready(self) -> None:
        while self.started < len(self.buckets):
            bucket = self.buckets[self.started]
            if len(bucket.ready) < len(bucket.params):
                return
            self._start(bucket)

    def start_all(self) -> None:
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])

    def _start(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            bucket.flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                    for p in bucket.params
                ]
            )
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        self.started += 1


class BucketedReducer:
    """Averages a parallelized model's gradients over the mesh in buckets that start during
    the backward (module docstring). Collective: every rank builds one, with the same model.

    Args:
        model: the output of parallelize() (replicated weights, expert shards).
        mesh: its ParallelMesh.
        bucket_mib: the size a bucket grows to before a new one starts (fp32 MiB).
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh, bucket_mib: float = 4.0):
        if not bucket_mib > 0:
            raise ValueError(f"bucket_mib ({bucket_mib}) must be > 0")
        self.mesh = mesh
        experts = {id(p) for p in expert_parameters(model)}
        trained = list(model.parameters())
        cap = int(bucket_mib * 2**20)
        self.groups = [
            _Group([p for p in trained if id(p) not in experts], mesh.world_group, cap),
            _Group([p for p in trained if id(p) in experts], mesh.dp_group, cap),
        ]
        self._paused = False
        self._where: dict[int, tuple[_Group, _Bucket]] = {}
        for group in self.groups:
            for bucket in group.buckets:
                for p in bucket.all_params:
                    self._where[id(p)] = (group, bucket)
                    p.register_post_accumulate_grad_hook(self._accumulated)

    @contextlib.contextmanager
    def paused(self):
        """Backwards in the block only accumulate into .grad (gradient accumulation's
        micro-batches but the last): no bucket is marked or started."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _accumulated(self, param: nn.Parameter) -> None:
        if self._paused:
            return
        group, bucket = self._where[id(param)]
        bucket.ready.add(id(param))
        group.start_ready()

    @torch.no_grad()
    def finish(self) -> None:
        """After the backward: start what has not started, wait, and write the averaged
        gradients back (None where no rank had a gradient)."""
        for group in self.groups:
            group.start_all()
        for group in self.groups:
            params = [p for bucket in group.buckets for p in bucket.params]
            if not params:
                continue
            had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
            had = had.to(self.mesh.device)
            dist.all_reduce(had, group=group.group)
            flags = iter(had.tolist())
            for bucket in group.buckets:
                bucket.work.wait()
                bucket.flat /= self.mesh.world_size
                for p, chunk in zip(
                    bucket.params, bucket.flat.split([p.numel() for p in bucket.params])
                ):
                    p.grad = chunk.view_as(p).to(p.dtype) if next(flags) else None
                bucket.ready.clear()
                bucket.flat = bucket.work = None
            group.started = 0
