"""Expert parallel equals single process: outputs and every gradient, for every router.

Each test spawns real gloo process groups on CPU (2 or 4 ranks). Every rank builds the
same seeded model twice: the single-process reference runs the EP group's whole batch, the
other copy is parallelized and runs the rank's own rows; both sides backpropagate the same
loss: each rank's (y_r * g_r).sum(), averaged over the W ranks by sync_gradients. Tokens are split
unevenly across ranks, a rank may hold none, and one case leaves an expert without tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from datetime import timedelta

import pytest
import torch
from helpers import make_moe

from moekit.parallel import (
    all_reduce_router_loads,
    build_mesh,
    data_parallel,
    parallelize,
    sync_gradients,
)
from moekit.parallel.all_to_all import expert_major_order
from moekit.parallel.launch import spawn_local
from moekit.routing import ROUTER_CLASSES

pytestmark = pytest.mark.distributed
TOKEN_CHOICE = (
    "softmax_topk",
    "noisy_topk",
    "switch",
    "gshard",
    "sigmoid_topk",
    "top_p",
    "sparsemixer",
)


@dataclasses.dataclass
class Case:
    name: str
    settings: dict
    sizes: tuple[int, ...] | None = None  # tokens per rank; None = the world's default
    starve_expert: bool = False


def router_settings(router: str) -> dict:
    settings = {"router": router, "balance_loss_coef": 0.0}
    if router == "switch":
        settings["top_k"] = 1
    if router == "sigmoid_topk":
        settings.update(num_groups=2, topk_groups=1, routed_scaling=2.5)
    if router == "soft":
        settings["slots_per_expert"] = 2
    return settings


def cases() -> list[Case]:
    out = [Case(router, router_settings(router)) for router in ROUTER_CLASSES]
    for router in TOKEN_CHOICE:
        out.append(Case(f"{router} drop", router_settings(router) | {"capacity_factor": 0.75}))
    out += [
        Case(
            "softmax_topk reroute priority",
            router_settings("softmax_topk")
            | {"capacity_factor": 0.75, "overflow": "reroute", "batch_priority": True},
        ),
        Case(
            "sigmoid_topk reroute",
            router_settings("sigmoid_topk") | {"capacity_factor": 0.75, "overflow": "reroute"},
        ),
        Case("expert_choice cf 0.5", router_settings("expert_choice") | {"capacity_factor": 0.5}),
        Case(
            "shared experts",
            router_settings("softmax_topk") | {"num_shared_experts": 1, "shared_expert_gate": True},
        ),
        Case(
            "empty rank, capacity",
            router_settings("softmax_topk") | {"capacity_factor": 1.0},
            sizes=(0, 9),
        ),
        Case("empty rank, sigmoid groups", router_settings("sigmoid_topk"), sizes=(7, 0)),
        Case(
            "softmax_topk groups (DeepSeek-V2)",
            router_settings("softmax_topk")
            | {"num_groups": 2, "topk_groups": 1, "routed_scaling": 1.5, "renormalize": False},
        ),
        Case("empty rank, expert choice", router_settings("expert_choice"), sizes=(0, 6)),
        Case("empty rank, soft", router_settings("soft"), sizes=(0, 3)),
        Case("expert without tokens", router_settings("softmax_topk"), starve_expert=True),
        Case(
            "gpt-oss router and experts",
            router_settings("softmax_topk")
            | {"router_bias": True, "expert_bias": True, "activation": "swiglu_clamped"},
        ),
    ]
    return out


def starve_last_expert(moe) -> None:
    """Positive inputs and a negative router row: the last expert is never in the top 2."""
    with torch.no_grad():
        moe.router.weight.abs_()
        moe.router.weight[-1] = -1.0


def check_case(case: Case, mesh, dp_groups: list[list[int]], ddp: bool = False) -> None:
    """dp_groups: for each EP group, its ranks; the reference runs each group's batch.

    ddp: wrap the model with data_parallel (DDP reduces the replicated weights).
    """
    W, E = mesh.world_size, 4
    reference = make_moe(seed=1, **case.settings).eval()
    if case.starve_expert:
        starve_last_expert(reference)
    model = parallelize(copy.deepcopy(reference), mesh)
    wrapped = data_parallel(model, mesh) if ddp else model
    soft = case.settings["router"] == "soft"
    sizes = case.sizes or tuple(5 + r % 3 for r in range(mesh.ep))
    torch.manual_seed(2)
    ref_loss, mine = 0.0, None
    for group in dp_groups:
        # Soft MoE routes (B, N, D) sequences; sizes then count sequences of 3 tokens.
        shape = (sum(sizes), 3, 8) if soft else (sum(sizes), 8)
        x = torch.randn(*shape)
        if case.starve_expert:
            x = x.abs()
        g = torch.randn(*shape)
        ref = reference(x).hidden
        ref_loss = ref_loss + (ref * g).sum() / W
        if mesh.rank in group:
            i = group.index(mesh.rank)
            rows = slice(sum(sizes[:i]), sum(sizes[: i + 1]))
            mine = (x[rows], g[rows], ref[rows].detach())
    x_r, g_r, expected = mine
    out = wrapped(x_r).hidden
    torch.testing.assert_close(
        out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case.name}: {m}"
    )
    (out * g_r).sum().backward()  # this rank's loss; sync_gradients averages over W
    ref_loss.backward()
    sync_gradients(model, mesh, experts_only=ddp)
    shard = model.experts
    local = slice(mesh.ep_rank * E // mesh.ep, (mesh.ep_rank + 1) * E // mesh.ep)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected_grad = ref_params[name].grad
        if name.startswith("experts.") and expected_grad is not None:
            expected_grad = expected_grad[local]
        if expected_grad is None:  # unused in eval (noisy top-k's noise gate)
            assert param.grad is None, f"{case.name}: {name} got a gradient"
            continue
        assert param.grad is not None, f"{case.name}: {name} has no gradient"
        torch.testing.assert_close(
            param.grad,
            expected_grad,
            atol=1e-5,
            rtol=1e-5,
            msg=lambda m, n=name: f"{case.name}: grad {n}: {m}",
        )
    if case.starve_expert and mesh.ep_rank == mesh.ep - 1:
        assert shard.w_up.grad[-1].abs().max() == 0, "the starved expert got a gradient"


def check_sigmoid_bias_update(mesh) -> None:
    """Loads summed over every rank: biases move as one process's would, and stay equal."""
    reference = make_moe(seed=3, **router_settings("sigmoid_topk")).train()
    model = parallelize(copy.deepcopy(reference), mesh)
    torch.manual_seed(4)
    x = torch.randn(mesh.world_size * 6, 8)
    reference(x)
    model(x[mesh.rank * 6 : (mesh.rank + 1) * 6])
    all_reduce_router_loads(model, mesh)
    reference.update_bias()
    model.update_bias()
    torch.testing.assert_close(model.router.bias, reference.router.bias, atol=0, rtol=0)


def equality_worker(mesh_shapes, names: list[str] | None) -> None:
    for ep in mesh_shapes:
        mesh = build_mesh(ep, timeout=timedelta(seconds=30), device=torch.device("cpu"))
        dp_groups = [[d * ep + e for e in range(ep)] for d in range(mesh.dp)]
        for case in cases():
            if (case.sizes is not None and len(case.sizes) != ep) or (
                names and case.name not in names
            ):
                continue
            check_case(case, mesh, dp_groups)
        check_sigmoid_bias_update(mesh)


def device_mesh_worker() -> None:
    """parallelize also takes a torch DeviceMesh with dims ("dp", "ep")."""
    from torch.distributed.device_mesh import init_device_mesh

    from moekit.parallel import mesh_from_device_mesh

    device_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))
    mesh = mesh_from_device_mesh(device_mesh)
    assert (mesh.ep, mesh.dp, mesh.ep_rank) == (2, 1, mesh.rank)
    reference = make_moe(seed=5, **router_settings("softmax_topk")).eval()
    model = parallelize(copy.deepcopy(reference), device_mesh)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(6))
    rows = slice(3 * mesh.rank, 3 * mesh.rank + 3)
    torch.testing.assert_close(
        model(x[rows]).hidden, reference(x).hidden[rows], atol=1e-5, rtol=1e-5
    )


def two_rank_worker() -> None:
    equality_worker((2,), None)
    device_mesh_worker()
    mesh = build_mesh(2, timeout=timedelta(seconds=30), device=torch.device("cpu"))
    for case in cases():  # DDP for the replicated weights: cases where every weight is used
        if case.name in ("shared experts", "softmax_topk reroute priority", "empty rank, capacity"):
            check_case(case, mesh, [[0, 1]], ddp=True)


def test_two_ranks_equal_single_process():
    spawn_local(two_rank_worker, world_size=2, timeout_s=240)


@pytest.mark.slow
def test_four_ranks_every_case_ep4_and_ep2_dp2():
    spawn_local(equality_worker, ((4, 2), None), world_size=4, timeout_s=400)


def test_expert_major_order():
    # 2 sources x 2 local experts; counts [[1, 2], [3, 0]] lay rows out source-major:
    # rows 0 (s0 e0), 1-2 (s0 e1), 3-5 (s1 e0). Expert-major: e0 <- 0, 3, 4, 5; e1 <- 1, 2.
    order = expert_major_order(torch.tensor([[1, 2], [3, 0]]))
    assert order.tolist() == [0, 3, 4, 5, 1, 2]
