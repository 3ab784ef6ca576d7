"""Checks that the distributed tests run inside their spawned workers (a worker imports
them from here, a helper module, not from a test module).

- expert parallelism equals one process: `cases()` (every router, capacities, empty ranks,
  a starved expert) and `check_case` (outputs and every gradient), `check_sigmoid_bias_update`
  (test_parallel_equality.py at EP 2 and 4; test_parallel_checkpoint.py at EP 2 x DP 2);
- `resume_worker`: the trainer stopped after 2 steps and resumed ends bit-identical to the
  uninterrupted run (test_parallel_checkpoint.py at EP 2 x DP 2).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from helpers import MICRO, make_moe
from safetensors.torch import load_file

from moekit.parallel import (
    all_reduce_router_loads,
    data_parallel,
    init_parallel,
    parallelize,
    sync_gradients,
)
from moekit.routing import ROUTER_CLASSES

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


def resume_worker(folder: str, text: str) -> None:
    """Uninterrupted run vs stopped after 2 steps and resumed: bit-identical weights.

    Runs inside a spawned world of 2 or 4 ranks (test_parallel_checkpoint.py: ep 2 x dp 2);
    the model is MICRO's (helpers.py).
    """
    from moekit.train import Trainer
    from moekit.train.data import prepare_run_data
    from moekit.train.overrides import build_configs

    mesh = init_parallel(2, timeout_s=30, device=torch.device("cpu"))
    model_flags = MICRO[: MICRO.index("--steps")]
    overrides = {
        key.removeprefix("--"): value for key, value in zip(model_flags[::2], model_flags[1::2])
    }
    overrides.update(
        {
            "train.steps": "4",
            "train.batch_size": "4",
            "train.seq_len": "32",
            "train.eval_every": "2",
            "train.eval_batches": "2",
            "train.checkpoint_every": "2",
        }
    )
    model_config, train_config = build_configs("tiny", overrides)

    def trainer(run, resume=False):
        data = prepare_run_data(f"{folder}/{run}", data=text, vocab_size=384, mesh=mesh)
        return Trainer(
            model_config,
            train_config,
            f"{folder}/{run}",
            data=data,
            mesh=mesh,
            resume=resume,
            show_progress=False,
        )

    trainer("whole").train()
    trainer("stopped").train(stop_at=2)
    resumed_trainer = trainer("stopped", resume=True)
    assert resumed_trainer.step == 2  # it continues, it does not start over
    resumed_trainer.train()
    whole = load_file(f"{folder}/whole/checkpoint/model.safetensors")
    resumed = load_file(f"{folder}/stopped/checkpoint/model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
