"""Consolidated checkpoints reload at another EP size (4 -> 2 -> 1), on 4 gloo ranks.

The same spawn (one 4-rank world is the expensive part) also runs the EP 2 x DP 2 equality
cases of test_parallel_equality.py (parallel_checks.py; expert gradients reduce over the DP group only, so a
doubled gradient fails here) and the trainer's resume at ep 2 x dp 2, which must end
bit-identical to the uninterrupted run (parallel_checks.resume_worker).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from helpers import write_text
from parallel_checks import cases, check_case, resume_worker
from safetensors.torch import load_file

from moekit import MoEConfig
from moekit.checkpoint import load_checkpoint
from moekit.models import ModelConfig, Transformer
from moekit.parallel import build_mesh, parallelize
from moekit.parallel.launch import spawn_local
from moekit.train.run import DistributedRun

pytestmark = pytest.mark.distributed
EP_DP_CASES = (
    "softmax_topk drop",
    "softmax_topk reroute priority",
    "expert_choice",
    "soft",
    "sigmoid_topk",
)


def micro_config() -> ModelConfig:
    # with router and expert biases (gpt-oss): the biases are sharded with the experts
    moe = MoEConfig(
        d_model=16,
        d_hidden=8,
        num_experts=4,
        top_k=2,
        num_shared_experts=1,
        router_bias=True,
        expert_bias=True,
    )
    return ModelConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe
    )


def rows_of(mesh, tokens_BL):
    per_rank = tokens_BL.shape[0] // mesh.world_size
    return tokens_BL[mesh.rank * per_rank : (mesh.rank + 1) * per_rank]


def optimizer_step(model, tokens_BL) -> torch.optim.Optimizer:
    """One AdamW step, so the checkpoint holds non-trivial moments."""
    from moekit.parallel import sync_gradients

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(tokens_BL[:, :-1], tokens_BL[:, 1:])
    out.loss.backward()
    sync_gradients(model, model.mesh)
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def reload_worker(folder: str) -> None:
    timeout, cpu = timedelta(seconds=30), torch.device("cpu")
    # EP 2 x DP 2 equality first: the cheapest place for a 4-rank world.
    mesh = build_mesh(2, timeout=timeout, device=cpu)
    for case in cases():
        if case.name in EP_DP_CASES:
            check_case(case, mesh, [[0, 1], [2, 3]])

    torch.manual_seed(0)
    tokens_BL = torch.randint(0, 64, (8, 12))
    logits = {}
    state = {"step": 1}
    for i, ep in enumerate((4, 2, 1)):
        mesh = build_mesh(ep, timeout=timeout, device=cpu)
        torch.manual_seed(100 + ep)  # a different init: everything must come from the file
        model = parallelize(Transformer(micro_config()), mesh)
        model.mesh = mesh
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if i == 0:
            optimizer = optimizer_step(model, rows_of(mesh, tokens_BL))
            DistributedRun(mesh).save(f"{folder}/ep4", model, optimizer, state)
        else:
            DistributedRun(mesh).load(f"{folder}/ep4", model, optimizer)
            saved = load_file(f"{folder}/ep4/checkpoint/optimizer.safetensors")
            for name, param in model.named_parameters():
                moment = optimizer.state[param]["exp_avg"]
                expected = saved[f"{name}.exp_avg"]
                if "experts." in name and "shared" not in name:
                    L = param.shape[0]
                    expected = expected[mesh.ep_rank * L : (mesh.ep_rank + 1) * L]
                torch.testing.assert_close(moment, expected, atol=0, rtol=0)
        with torch.no_grad():
            logits[ep] = model.eval()(rows_of(mesh, tokens_BL)).logits
    for ep in (2, 1):
        torch.testing.assert_close(logits[ep], logits[4], atol=1e-5, rtol=1e-5)

    if mesh.rank == 0:  # a plain single-process model reads the same file
        single = Transformer(micro_config())
        load_checkpoint(f"{folder}/ep4", single)
        with torch.no_grad():
            full = single.eval()(tokens_BL).logits
        torch.testing.assert_close(full[: logits[4].shape[0]], logits[4], atol=1e-5, rtol=1e-5)
        experts = load_file(f"{folder}/ep4/checkpoint/model.safetensors")[
            "layers.0.ffn.experts.w_up"
        ]
        assert experts.shape[0] == 4, experts.shape


def four_rank_worker(folder: str, text: str) -> None:
    reload_worker(folder)
    resume_worker(f"{folder}/resume", text)


def test_checkpoint_at_ep4_reloads_at_ep2_and_ep1_and_resume_is_bit_identical(tmp_path):
    text = write_text(tmp_path / "source.txt")
    spawn_local(four_rank_worker, (str(tmp_path), str(text)), world_size=4, timeout_s=300)
