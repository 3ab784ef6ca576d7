"""Adding experts: the output is unchanged at the moment of adding (softmax top-k with and
without renormalisation, sigmoid top-k, dense), training then routes tokens to the new
experts, and the routers that cannot be extended exactly are refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch

from moekit import MoEConfig
from moekit.models import ModelConfig, Transformer
from moekit.surgery import add_experts, add_experts_unsupported, added_experts_config

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_moe(seed: int = 0, **moe_options) -> Transformer:
    """A micro MoE with spread-out router weights and biases, as after training."""
    settings = dict(d_model=16, d_hidden=12, num_experts=4, top_k=2) | moe_options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        moe = MoEConfig(**settings)
    config = ModelConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for layer in config.moe_layers:
            router = model.layers[layer].ffn.router
            if hasattr(router, "weight"):  # the soft router has slots instead
                router.weight.normal_(0.0, 0.5)
            if hasattr(router, "bias"):
                router.bias.normal_(0.0, 0.2)
    return model


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("offset", 3, dict(router="sigmoid_topk")),
    ("offset", 2, dict(router="sigmoid_topk", renormalize=False)),
    ("offset", 5, dict(router="sigmoid_topk", routed_scaling=2.5, top_k=3)),
    ("split", 4, dict(router="softmax_topk")),
    ("split", 4, dict(router="softmax_topk", renormalize=False)),
    ("split", 8, dict(router="softmax_topk", top_k=1)),
    ("split", 4, dict(router="sigmoid_topk")),
    ("split", 4, dict(router="sigmoid_topk", renormalize=False)),
    ("split", 4, dict(router="noisy_topk")),
    ("split", 4, dict(router="dense")),
    ("split", 4, dict(router="softmax_topk", num_shared_experts=1, activation="gelu")),
    ("grow", 4, dict(router="softmax_topk")),
    ("grow", 8, dict(router="softmax_topk", renormalize=False, top_k=1)),
    ("grow", 4, dict(router="sigmoid_topk", renormalize=False)),
    ("grow", 4, dict(router="dense", activation="relu")),
]


@pytest.mark.parametrize("method,num_new,options", CASES, ids=lambda x: str(x)[:40])
def test_logits_are_unchanged_at_the_moment_of_adding(method, num_new, options):
    model = trained_moe(**options).eval()
    grown = add_experts(model, num_new, method).eval()
    moe = grown.config.moe
    assert moe.num_experts == model.config.moe.num_experts + num_new
    expected = model(batch()).logits
    got = grown(batch()).logits
    if method == "offset":
        assert torch.equal(got, expected)  # the same experts run with the same weights
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_offset_keeps_new_experts_out_even_where_their_score_is_highest():
    model = trained_moe(router="sigmoid_topk").eval()
    grown = add_experts(model, 2, "offset").eval()
    with torch.no_grad():  # make the copies' router rows dominate: bias alone keeps them out
        for layer in grown.config.moe_layers:
            grown.layers[layer].ffn.router.weight[4:] = (
                100.0 * grown.layers[layer].ffn.router.weight[:2]
            )
    out = grown(batch(), return_expert_ids=True)
    assert all((ids < 4).all() for ids in out.expert_ids)
    assert torch.equal(out.logits, model(batch()).logits)


def train(model: Transformer, steps: int) -> None:
    from moekit import update_router_biases

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        out = model(batch(step), batch(step + 100))
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)


def new_expert_tokens(model: Transformer, num_old: int) -> int:
    with torch.no_grad():
        ids = model.eval()(batch(7), return_expert_ids=True).expert_ids
    return sum(int((layer_ids >= num_old).sum()) for layer_ids in ids)


def test_offset_new_experts_receive_tokens_once_the_balancing_bias_rises():
    # bias_update_rate 0.1: the 1.01 offset is closed within about 10 steps.
    grown = add_experts(trained_moe(router="sigmoid_topk", bias_update_rate=0.1), 2, "offset")
    assert new_expert_tokens(grown, 4) == 0
    train(grown, 30)
    assert new_expert_tokens(grown, 4) > 0


def with_sibling(ids_BTK: torch.Tensor, num_old: int) -> torch.Tensor:
    """For each chosen expert: is its other part (e +- num_old) chosen by the same token?"""
    sibling_BTK = (ids_BTK + num_old) % (2 * num_old)
    return (ids_BTK.unsqueeze(-1) == sibling_BTK.unsqueeze(-2)).any(-1)


def test_split_parts_receive_tokens_and_separate_in_training():
    model = trained_moe(router="softmax_topk")
    grown = add_experts(model, 4, "split")
    with torch.no_grad():
        ids = grown.eval()(batch(7), return_expert_ids=True).expert_ids[0]
    # At the start every token picks both parts of each expert it picked before.
    assert with_sibling(ids, 4).all() and (ids >= 4).sum() == ids.numel() // 2
    train(grown, 40)
    router = grown.layers[0].ffn.router.weight
    assert not torch.allclose(router[:4], router[4:], atol=1e-2)
    with torch.no_grad():
        ids = grown.eval()(batch(7), return_expert_ids=True).expert_ids[0]
    assert (ids >= 4).any() and not with_sibling(ids, 4).all()


def test_grow_keeps_the_width_and_its_new_units_start_learning():
    model = trained_moe(router="softmax_topk")
    grown = add_experts(model, 4, "grow")
    moe = grown.config.moe
    assert (moe.num_experts, moe.top_k, moe.d_hidden) == (8, 4, 12)
    w_down = grown.layers[0].ffn.experts.w_down
    assert torch.equal(w_down[:, 6:], torch.zeros_like(w_down[:, 6:]))  # new units add 0
    train(grown, 2)
    assert (w_down[:, 6:] != 0).all()


UNSUPPORTED = [
    ("offset", dict(router="softmax_topk"), "no per-expert score offset"),
    ("split", dict(router="switch", top_k=1), "cannot split"),
    ("split", dict(router="top_p", top_k=3), "cannot split"),
    ("split", dict(router="expert_choice"), "cannot split"),
    ("split", dict(router="soft"), "cannot split"),
    ("offset", dict(router="sigmoid_topk", num_groups=2), "group-limited"),
    ("split", dict(router="softmax_topk", num_groups=2, top_k=1), "group-limited"),
    ("split", dict(capacity_factor=1.0), "capacity_factor"),
]


@pytest.mark.parametrize("method,options,reason", UNSUPPORTED, ids=lambda x: str(x)[:30])
def test_unsupported_routers_are_refused_with_the_reason(method, options, reason):
    model = trained_moe(**options)
    assert reason in add_experts_unsupported(model.config, method)
    with pytest.raises(ValueError, match=reason):
        add_experts(model, 4, method)


def test_split_counts_and_widths_are_checked():
    config = trained_moe().config
    with pytest.raises(ValueError, match="multiple of num_experts"):
        added_experts_config(config, 3, "split")
    with pytest.raises(ValueError, match="divisible"):
        added_experts_config(config, 16, "split")  # 5 parts of 12 units
    with pytest.raises(ValueError, match="positive integer"):
        added_experts_config(trained_moe(router="sigmoid_topk").config, 0, "offset")
    grown = added_experts_config(config, 4, "split").moe
    assert (grown.num_experts, grown.top_k, grown.d_hidden) == (8, 4, 6)
