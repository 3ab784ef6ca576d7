"""Expert parallel equals single process: outputs and every gradient, for every router.

Each test spawns real gloo process groups on CPU (2 or 4 ranks). Every rank builds the
same seeded model twice: the single-process reference runs the EP group's whole batch, the
other copy is parallelized and runs the rank's own rows; both sides backpropagate the same
loss: each rank's (y_r * g_r).sum(), averaged over the W ranks by sync_gradients. Tokens are split
unevenly across ranks, a rank may hold none, and one case leaves an expert without tokens.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
from helpers import make_moe
from parallel_checks import cases, check_case, check_sigmoid_bias_update, router_settings

from moekit.parallel import (
    build_mesh,
    parallelize,
)
from moekit.parallel.all_to_all import expert_major_order
from moekit.parallel.launch import spawn_local

pytestmark = pytest.mark.distributed


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
