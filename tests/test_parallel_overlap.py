"""BucketedReducer (the gradient all-reduce started from post-accumulate-grad hooks during
the backward) gives exactly sync_gradients' gradients, on 2 gloo processes, at EP 1 x DP 2
and EP 2, with buckets small enough that most start before the backward ends; a parameter
with a gradient on one rank only counts as zero on the other, one without any stays None.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from torch import nn

from moekit import MoEConfig
from moekit.models import ModelConfig, Transformer
from moekit.parallel import build_mesh, parallelize, sync_gradients
from moekit.parallel.launch import spawn_local
from moekit.parallel.overlap import BucketedReducer

pytestmark = pytest.mark.distributed


def _model(mesh, extra: bool = True) -> nn.Module:
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, top_k=2, router="softmax_topk")
    config = ModelConfig(
        vocab_size=64, d_model=16, num_layers=3, num_heads=2, max_seq_len=16, moe=moe
    )
    torch.manual_seed(0)
    model = parallelize(Transformer(config), mesh)
    if extra:
        model.register_parameter("rank0_only", nn.Parameter(torch.ones(3)))
        model.register_parameter("unused", nn.Parameter(torch.ones(3)))
    return model


def _backward(model, tokens, rank: int) -> None:
    out = model(tokens, tokens)
    loss = out.loss + out.aux_loss
    if rank == 0 and hasattr(model, "rank0_only"):
        loss = loss + model.rank0_only.square().sum()
    loss.backward()


def _worker(ep: int) -> None:
    mesh = build_mesh(ep, timeout=timedelta(seconds=60), device=torch.device("cpu"))
    torch.manual_seed(1 + mesh.rank)
    tokens = torch.randint(0, 64, (2, 16))
    reference, overlapped = _model(mesh), _model(mesh)
    reducer = BucketedReducer(overlapped, mesh, bucket_mib=0.002)  # ~520 floats a bucket
    assert len(reducer.groups[0].buckets) > 5
    for _ in range(2):  # twice: the reducer resets itself for the next step
        for model in (reference, overlapped):
            model.zero_grad(set_to_none=True)
        _backward(reference, tokens, mesh.rank)
        sync_gradients(reference, mesh)
        _backward(overlapped, tokens, mesh.rank)
        # The root's own parameters come first in model.parameters(), so the extra ones sit
        # in the last replicated bucket: "unused" has no gradient anywhere, so that bucket
        # starts in finish(); every bucket before it started during the backward.
        assert reducer.groups[0].started == len(reducer.groups[0].buckets) - 1
        reducer.finish()
        grads = dict(reference.named_parameters())
        for name, param in overlapped.named_parameters():
            want = grads[name].grad
            if want is None:
                assert param.grad is None, name
            else:
                assert torch.equal(param.grad, want), name
        assert overlapped.unused.grad is None
        assert torch.equal(overlapped.rank0_only.grad, torch.full((3,), 2.0 / 2))
    # Without them, every bucket starts during the backward (the hooks run only there).
    plain = _model(mesh, extra=False)
    plain_reducer = BucketedReducer(plain, mesh, bucket_mib=0.002)
    _backward(plain, tokens, mesh.rank)
    for group in plain_reducer.groups:
        assert group.started == len(group.buckets)
    plain_reducer.finish()


@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "ep2"])
def test_bucketed_reduction_during_backward_equals_sync_gradients(ep):
    spawn_local(_worker, (ep,), world_size=2, timeout_s=180)
