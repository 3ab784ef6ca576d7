"""FSDP2 composed with expert parallelism equals one process: 10 training steps of losses
and the final weights, on 2 and 4 gloo processes, for a token-choice and a sigmoid router.

# W world size, ep expert-parallel size, dp = W / ep
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moekit import MoEConfig
from moekit.models import ModelConfig, Transformer
from moekit.moe import update_router_biases
from moekit.parallel import all_reduce_router_loads, build_mesh, parallelize
from moekit.parallel.all_to_all import ExpertParallelExperts
from moekit.parallel.fsdp import fully_shard_model, reduce_and_clip_sharded, sharded_bytes
from moekit.parallel.launch import spawn_local

pytestmark = pytest.mark.distributed
STEPS, BATCH, SEQ = 10, 4, 16


def _config(router: str) -> ModelConfig:
    # No balance loss: each rank's f_i * P_i over its own tokens is not the global one (a
    # known property of data parallelism, not of the sharding); z-loss is a plain mean.
    moe = MoEConfig(
        d_model=16, d_hidden=16, num_experts=4, top_k=2, router=router,
        balance_loss_coef=0.0, z_loss_coef=1e-3, bias_update_rate=0.01,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=SEQ, moe=moe
    )


def _step(model, optimizer, tokens, clip):
    out = model(tokens, tokens)
    (out.loss + out.aux_loss).backward()
    clip()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_router_biases(model)
    return out.loss.detach()


def _single_process(router: str, batches):
    torch.manual_seed(0)
    model = Transformer(_config(router))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # noqa: E731
    losses = [_step(model, optimizer, b, clip).item() for b in batches]
    return losses, model.state_dict(), sum(p.numel() * 4 for p in model.parameters())


def _worker(router: str, ep: int) -> None:
    mesh = build_mesh(ep, timeout=timedelta(seconds=60), device=torch.device("cpu"))
    W, rank = mesh.world_size, mesh.rank
    torch.manual_seed(1)
    batches = torch.randint(0, 64, (STEPS, BATCH, SEQ))
    ref_losses, ref_state, full_param_bytes = _single_process(router, batches)

    torch.manual_seed(0)
    model = fully_shard_model(parallelize(Transformer(_config(router)), mesh), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)

    def clip():
        norm = reduce_and_clip_sharded(model, 0.5, mesh)
        all_reduce_router_loads(model, mesh)
        return norm

    rows = slice(rank * BATCH // W, (rank + 1) * BATCH // W)
    for step, batch in enumerate(batches):
        loss = _step(model, optimizer, batch[rows], clip).double()
        dist.all_reduce(loss, group=mesh.world_group)
        got = loss.item() / W
        assert abs(got - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), (
            step,
            got,
            ref_losses[step],
        )

    # Weights: every shard gathered back equals the single-process weights (this rank's
    # experts: its EP slice of them).
    for name, param in model.named_parameters():
        full = param.full_tensor()
        expected = ref_state[name]
        owner = _owner(model, name)
        if owner is not None:
            expected = expected[owner.first_expert : owner.first_expert + owner.num_experts]
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5, msg=name)

    # Memory: this rank holds 1/W of every parameter (and of its AdamW moments), up to the
    # rounding of dim 0 into W shards.
    held = sharded_bytes(model, optimizer)
    assert held["parameters"] <= full_param_bytes / W * 1.25 + 1024, (held, full_param_bytes)
    assert held["optimizer"] <= 2 * held["parameters"] + 64


def _owner(model, name: str) -> ExpertParallelExperts | None:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    return module if isinstance(module, ExpertParallelExperts) else None


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize(
    ("world", "ep"), [(2, 1), (2, 2), (4, 2)], ids=["fsdp2", "fsdp2xep2", "fsdp4xep2"]
)
def test_fsdp_and_expert_parallel_equal_one_process(router, world, ep):
    spawn_local(_worker, (router, ep), world_size=world, timeout_s=240)
