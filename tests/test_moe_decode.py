"""The small-batch path (each token's experts gathered, for decoding) equals the general
dispatch path for every token-choice router, and only runs where it applies."""

from __future__ import annotations

import pytest
import torch

import moekit.moe
from moekit import MoE, MoEConfig

TOKEN_CHOICE = [
    dict(router="softmax_topk"),
    dict(router="softmax_topk", num_shared_experts=1, shared_expert_gate=True),
    dict(router="noisy_topk"),
    dict(router="switch", top_k=1),
    dict(router="gshard"),
    dict(router="sigmoid_topk", num_groups=4, topk_groups=2, routed_scaling=2.5),
    dict(router="softmax_topk", num_groups=4, topk_groups=2, routed_scaling=1.5, renormalize=False),
    dict(router="top_p", top_p=0.6, top_k=3),
    dict(router="dense"),
    dict(router="softmax_topk", activation="gelu", renormalize=False),
    dict(router="softmax_topk", router_bias=True, expert_bias=True, activation="swiglu_clamped"),
]


def _layer(case: dict) -> MoE:
    torch.manual_seed(0)
    fields = dict(d_model=32, d_hidden=24, num_experts=8, top_k=2) | case
    layer = MoE(MoEConfig(**fields)).eval()
    if fields.get("router_bias"):  # zero at init: a bias that changes the choice
        with torch.no_grad():
            layer.router.logit_bias.copy_(torch.randn(8) * 0.5)
    if fields["router"] == "sigmoid_topk":  # a selection bias that changes the choice
        layer.router.bias.copy_(torch.randn(8) * 0.3)
    return layer


def _run(layer: MoE, x: torch.Tensor, small: bool, monkeypatch):
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(moekit.moe, "SMALL_BATCH_ROWS", 1000 if small else 0)
        assert layer.gathers_experts(x.numel() // x.shape[-1]) == small
        return layer(x)


@pytest.mark.parametrize("case", TOKEN_CHOICE, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("num_tokens", [1, 2, 5])
def test_small_batch_path_equals_the_general_path(case, num_tokens, monkeypatch):
    layer = _layer(case)
    x = torch.randn(num_tokens, 1, 32)
    small = _run(layer, x, True, monkeypatch)
    general = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(small.hidden, general.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.aux_loss, general.aux_loss, atol=1e-6, rtol=1e-5)
    assert torch.equal(small.stats.tokens_per_expert, general.stats.tokens_per_expert)
    torch.testing.assert_close(small.stats.load_cv, general.stats.load_cv)


def test_small_batch_path_runs_each_token_through_its_experts():
    # The oracle: token t's output is the weighted sum of its chosen experts' MLPs.
    layer = _layer(dict(router="softmax_topk"))
    x_TD = torch.randn(3, 32)
    with torch.no_grad():
        out = layer(x_TD).hidden
        decision = layer.router.route(x_TD, None)
    experts = layer.experts
    for t in range(3):
        expected = sum(
            w * experts.forward_reference(x_TD[t : t + 1], _one_hot_count(e, 8))
            for w, e in zip(decision.weights_TK[t], decision.ids_TK[t].tolist())
        )
        torch.testing.assert_close(out[t : t + 1], expected, atol=1e-5, rtol=1e-5)


def _one_hot_count(expert: int, num_experts: int) -> torch.Tensor:
    counts_E = torch.zeros(num_experts, dtype=torch.long)
    counts_E[expert] = 1
    return counts_E


@pytest.mark.parametrize(
    "case",
    [
        dict(router="softmax_topk", capacity_factor=1.0),
        dict(router="expert_choice"),
        dict(router="soft"),
    ],
    ids=["capacity", "expert_choice", "soft"],
)
def test_capacity_and_non_causal_layers_keep_the_general_path(case):
    layer = _layer(case)
    with torch.no_grad():
        assert not layer.gathers_experts(1)


def test_training_and_large_calls_keep_the_general_path():
    layer = _layer(dict(router="softmax_topk"))
    assert not layer.gathers_experts(1)  # autograd is on: the path is inference-only
    with torch.no_grad():
        limit = moekit.moe.SMALL_BATCH_ROWS // 2
        assert layer.gathers_experts(limit)
        assert not layer.gathers_experts(limit + 1)


def test_heterogeneous_experts_keep_the_general_path():
    from moekit.experts import MLP, ModuleExperts

    layer = _layer(dict(router="softmax_topk"))
    layer.experts = ModuleExperts([MLP(32, 8 + e) for e in range(8)])
    with torch.no_grad():
        assert not layer.gathers_experts(1)
        assert layer(torch.randn(1, 32)).hidden.shape == (1, 32)


def test_lora_experts_keep_the_general_path():
    # A subclass computes its own way (adapters beside the 3-D weights).
    from moekit.models.lora import LoRAConfig, LoRAGroupedExperts

    layer = _layer(dict(router="softmax_topk"))
    layer.experts = LoRAGroupedExperts(layer.experts, LoRAConfig(rank=2))
    with torch.no_grad():
        assert not layer.gathers_experts(1)
