"""Replay under expert parallelism and FSDP equals one process: the trace's experts, the
outputs, every gradient and the training losses, on real gloo process groups.

Each rank replays its own rows of the trace (replay_rows with the rows it holds); the
single-process reference replays all of them. The trace comes from another model, so
every layer is sent to experts its own router would not pick.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from builders import parallel_config, record_layer
from helpers import make_moe

from moekit.models import Transformer
from moekit.parallel import build_mesh, parallelize, sync_gradients
from moekit.parallel.fsdp import fully_shard_model, reduce_and_clip_sharded
from moekit.parallel.launch import spawn_local
from moekit.traces import replay_rows
from moekit.traces.run import record_forward

pytestmark = pytest.mark.distributed

LAYER_CASES = {
    "dropless": dict(router="softmax_topk"),
    "reroute": dict(router="softmax_topk", capacity_factor=0.75, overflow="reroute"),
    "sigmoid drop": dict(router="sigmoid_topk", num_groups=2, topk_groups=1, capacity_factor=1.0),
}


def layer_worker() -> None:
    """Expert parallelism (2 ranks, 5 and 8 rows): outputs and gradients of the replayed
    layer equal the single process's, in both modes."""
    mesh = build_mesh(2, timeout=timedelta(seconds=30), device=torch.device("cpu"))
    for name, settings in LAYER_CASES.items():
        for mode in ("ids", "ids+weights"):
            reference = make_moe(seed=1, balance_loss_coef=0.0, **settings).eval()
            model = parallelize(copy.deepcopy(reference), mesh)
            torch.manual_seed(2)
            x, g = torch.randn(13, 8), torch.randn(13, 8)
            trace = record_layer(make_moe(seed=7, **settings).eval(), x, seed=0)
            own = reference.router.route(x, None).ids_TK
            assert not torch.equal(trace.ids[:, 0].long(), own), name  # other experts
            with replay_rows(reference, trace, torch.arange(13), mode):
                ref = reference(x).hidden
            (ref * g).sum().div(2).backward()
            rows = slice(0, 5) if mesh.rank == 0 else slice(5, 13)
            with replay_rows(model, trace, torch.arange(13)[rows], mode):
                out = model(x[rows]).hidden
            torch.testing.assert_close(out, ref[rows].detach(), atol=1e-5, rtol=1e-5)
            (out * g[rows]).sum().backward()
            sync_gradients(model, mesh)
            local = slice(mesh.ep_rank * 2, mesh.ep_rank * 2 + 2)
            ref_params = dict(reference.named_parameters())
            for pname, param in model.named_parameters():
                expected = ref_params[pname].grad
                if expected is None:
                    assert param.grad is None or not param.grad.any(), (name, mode, pname)
                    continue
                if pname.startswith("experts."):
                    expected = expected[local]
                torch.testing.assert_close(
                    param.grad,
                    expected,
                    atol=1e-5,
                    rtol=1e-5,
                    msg=lambda m, n=f"{name} {mode} {pname}": f"{n}: {m}",
                )


def fsdp_worker(ep: int) -> None:
    """FSDP2 (x EP): three training steps on batches whose routing a trace of another
    model fixes; the losses and the final weights equal one process's."""
    mesh = build_mesh(ep, timeout=timedelta(seconds=60), device=torch.device("cpu"))
    W, rank = mesh.world_size, mesh.rank
    B, N = 4, 16
    torch.manual_seed(1)
    batches = torch.randint(0, 64, (3, B, N))
    torch.manual_seed(9)
    other = Transformer(parallel_config("softmax_topk")).eval()
    traces = [record_forward(other, batch.tolist()) for batch in batches]

    def train(model, rows_of_batch, clip):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        losses = []
        for batch, trace in zip(batches, traces):
            rows = rows_of_batch(batch)
            tokens = batch[rows]
            with replay_rows(model, trace, torch.arange(B * N).reshape(B, N)[rows].reshape(-1)):
                out = model(tokens, tokens)
            (out.loss + out.aux_loss).backward()
            clip(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.detach().double())
        return losses

    torch.manual_seed(0)
    reference = Transformer(parallel_config("softmax_topk"))
    model = fully_shard_model(parallelize(copy.deepcopy(reference), mesh), mesh)
    ref_losses = train(
        reference,
        lambda b: slice(0, B),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5),
    )
    mine = slice(rank * B // W, (rank + 1) * B // W)
    losses = train(model, lambda b: mine, lambda m: reduce_and_clip_sharded(m, 0.5, mesh))
    for step, (loss, expected) in enumerate(zip(losses, ref_losses)):
        dist.all_reduce(loss, group=mesh.world_group)
        assert abs(loss.item() / W - expected.item()) <= 1e-5 * abs(expected.item()), step
    state = reference.state_dict()
    for name, param in model.named_parameters():
        full = param.full_tensor()
        expected = state[name]
        if full.shape != expected.shape:  # this rank's experts
            first = mesh.ep_rank * full.shape[0]
            expected = expected[first : first + full.shape[0]]
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_replay_under_expert_parallelism_equals_one_process():
    spawn_local(layer_worker, world_size=2, timeout_s=240)


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp2", "fsdp2xep2"])
def test_replay_under_fsdp_equals_one_process(ep):
    spawn_local(fsdp_worker, (ep,), world_size=2, timeout_s=240)
