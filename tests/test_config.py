"""Configuration: bad input is a ValueError naming the value; no-op settings warn once."""

from __future__ import annotations

import warnings

import pytest
import torch

from moekit import ROUTERS, MoE, MoEConfig

BASE = dict(d_model=8, d_hidden=6, num_experts=4)


def config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=5), r"top_k \(5\) must be <= num_experts \(4\)"),
        (dict(top_k=0), r"top_k \(0\)"),
        (dict(top_k=-1), r"top_k \(-1\)"),
        (dict(capacity_factor=0.0), r"capacity_factor \(0.0\)"),
        (dict(capacity_factor=-1.5), r"capacity_factor \(-1.5\)"),
        (dict(router="hash"), r"unknown router 'hash'"),
        (dict(activation="tanh"), r"unknown activation 'tanh'"),
        (dict(overflow="spill"), r"unknown overflow policy 'spill'"),
        (
            dict(router="sigmoid_topk", num_groups=3),
            r"num_groups \(3\) must divide num_experts \(4\)",
        ),
        (dict(router="sigmoid_topk", num_groups=0), r"num_groups \(0\)"),
        (dict(router="switch", top_k=2), r"top_k \(2\)"),
        (dict(d_model=0), r"d_model \(0\)"),
        (dict(num_experts=2.5), r"num_experts \(2.5\)"),
        (dict(top_p=0.0), r"top_p \(0.0\)"),
        (dict(jitter_eps=1.0), r"jitter_eps \(1.0\)"),
        (dict(router="sparsemixer", jitter_eps=0.0), r"sparsemixer .* jitter_eps \(0.0\)"),
        (dict(router="sparsemixer", selection_bias=True), "not supported by the sparsemixer"),
        (dict(router="sigmoid_topk", selection_bias=True), "not supported by the sigmoid_topk"),
        (dict(slots_per_expert=0), r"slots_per_expert \(0\)"),
        (dict(router="soft", router_bias=True), "router_bias is not supported by the soft router"),
        (dict(swiglu_limit=0.0), r"swiglu_limit \(0.0\) must be > 0"),
        (dict(z_loss_coef=-0.1), r"z_loss_coef \(-0.1\)"),
        (dict(router="sigmoid_topk", num_groups=2, topk_groups=3), r"topk_groups \(3\)"),
        # sigmoid_topk picks inside topk_groups groups of 2 experts: top_k 3 cannot fit in one.
        (dict(router="sigmoid_topk", top_k=3, num_groups=2, topk_groups=1), r"top_k \(3\) exceeds"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_wrong_last_dim_raises_at_forward():
    moe = MoE(config())
    with pytest.raises(ValueError, match=r"input last dimension \(7\) must equal d_model \(8\)"):
        moe(torch.randn(3, 7))


@pytest.mark.parametrize(
    "router", ["softmax_topk", "expert_choice", "soft", "sigmoid_topk", "dense"]
)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_zero_tokens_give_an_empty_output_and_zero_loss(router, shape):
    moe = MoE(config(router=router, capacity_factor=None, z_loss_coef=0.1))
    out = moe(torch.randn(shape))
    assert out.hidden.shape == shape
    assert out.aux_loss.item() == 0.0
    assert out.stats.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_zero_tokens_backward_gives_an_empty_input_gradient():
    moe = MoE(config())
    x = torch.randn(0, 8, requires_grad=True)
    out = moe(x)
    (out.hidden.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == (0, 8)


def test_groups_of_a_router_without_groups_warn_instead_of_raising():
    # Groups only limit sigmoid_topk and softmax_topk; for top_p they have no effect, so a
    # top_k larger than one group is fine there.
    with pytest.warns(UserWarning, match="only apply to the sigmoid_topk and softmax_topk"):
        cfg = config(router="top_p", top_k=3, num_groups=2, topk_groups=1)
    assert cfg.top_k == 3
    with pytest.raises(ValueError, match=r"top_k \(3\) exceeds"):
        config(router="softmax_topk", top_k=3, num_groups=2, topk_groups=1)


def test_dense_router_uses_every_expert():
    assert config(router="dense", top_k=1).top_k == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router="dense", capacity_factor=1.0), "capacity_factor has no effect"),
        (dict(router="soft", capacity_factor=1.0), "capacity_factor has no effect"),
        (dict(overflow="reroute"), "no effect when capacity_factor is None"),
        (dict(batch_priority=True), "no effect when capacity_factor is None"),
        (dict(router="expert_choice", capacity_factor=1.0, overflow="reroute"), "expert_choice"),
        (dict(router="top_p", num_groups=2), "only apply to the sigmoid_topk and softmax_topk"),
        (dict(load_loss_coef=0.1), "load_loss_coef"),
        (dict(router="top_p", routed_scaling=2.5), "routed_scaling only applies"),
        (dict(shared_expert_gate=True), "without shared experts"),
        (dict(swiglu_limit=3.0), "only apply to the swiglu_clamped activation"),
    ],
)
def test_setting_without_effect_warns_once(overrides, message):
    with pytest.warns(UserWarning, match=message):
        config(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config(**overrides)  # the second identical config is silent


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(capacity_factor=1.0, overflow="reroute", batch_priority=True),
        dict(router="sigmoid_topk", num_groups=2),
        dict(router="noisy_topk", load_loss_coef=0.1),
        dict(router="expert_choice", capacity_factor=2.0),
    ],
)
def test_settings_with_effect_do_not_warn(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config(**overrides)


def test_capacity_formula():
    # C = ceil(cf * T * top_k / E), at least 1, at most T.
    cfg = config(top_k=2, capacity_factor=1.25)
    assert cfg.capacity(10) == 7  # ceil(1.25 * 10 * 2 / 4) = ceil(6.25)
    assert cfg.capacity(1) == 1  # ceil(0.625), and a token fits at most once
    assert config(top_k=2, capacity_factor=0.01).capacity(10) == 1
    assert config(top_k=4, capacity_factor=4.0).capacity(10) == 10
    assert config(capacity_factor=None).capacity(10) is None


def test_segmented_keeps_parameter_counts():
    cfg = config(d_hidden=12, top_k=2).segmented(3)
    assert (cfg.num_experts, cfg.top_k, cfg.d_hidden) == (12, 6, 4)
    with pytest.raises(ValueError, match=r"factor \(5\)"):
        config(d_hidden=12).segmented(5)


def test_router_names_match_the_registry():
    from moekit.routing import ROUTER_CLASSES

    assert tuple(ROUTER_CLASSES) == ROUTERS
