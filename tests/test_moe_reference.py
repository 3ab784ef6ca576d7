"""The fast MoE layer equals the slow per-token reference: forward, aux loss, every gradient.

The layer runs in float32, the reference in float64 on a copy of the same module; they must
agree to 1e-5. Training mode for noisy_topk, switch, gshard and sparsemixer is compared by
seeding the global generator identically before each (see reference_moe.py).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from builders import TOKEN_CHOICE
from helpers import make_moe, tokens
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_moe import reference_moe

from moekit import ROUTERS

TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_COEFS = dict(
    balance_loss_coef=0.1, z_loss_coef=0.01, importance_loss_coef=0.1, load_loss_coef=0.1
)

CAPACITY = {
    "dropless": dict(capacity_factor=None),
    "drop": dict(capacity_factor=0.75, overflow="drop"),
    "reroute": dict(capacity_factor=0.75, overflow="reroute"),
    "drop_priority": dict(capacity_factor=0.75, overflow="drop", batch_priority=True),
    "reroute_priority": dict(capacity_factor=0.75, overflow="reroute", batch_priority=True),
}
OTHER = {
    "dense": dict(router="dense"),
    "expert_choice_cf_none": dict(router="expert_choice", capacity_factor=None),
    "expert_choice_cf_0.5": dict(router="expert_choice", capacity_factor=0.5),
    "expert_choice_cf_2_top1": dict(router="expert_choice", capacity_factor=2.0, top_k=1),
    "soft": dict(router="soft"),
    "soft_2_slots": dict(router="soft", slots_per_expert=2),
}
SHARED = dict(num_shared_experts=1, d_shared_hidden=5, shared_expert_gate=True)


def run_both(moe, x, train: bool, seed: int = 123):
    """Fast layer on x (float32) and reference on a float64 copy; returns (out, ref, xs)."""
    moe.train(train)
    reference = copy.deepcopy(moe)  # before the forward: sigmoid_topk updates a buffer
    x_fast = x.clone().requires_grad_()
    x_ref = x.double().requires_grad_()
    torch.manual_seed(seed)
    out = moe(x_fast)
    torch.manual_seed(seed)
    ref = reference_moe(reference, x_ref)
    return out, ref, reference, x_fast, x_ref


def assert_same_gradients(moe, out, reference, ref, x_fast, x_ref):
    upstream = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(7))
    ((out.hidden * upstream).sum() + out.aux_loss).backward()
    ((ref.hidden * upstream.double()).sum() + ref.aux_loss).backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad.float(), **TOL)
    reference_params = dict(reference.named_parameters())
    for name, param in moe.named_parameters():
        expected = reference_params[name].grad
        got = param.grad
        if expected is None:
            assert got is None or not got.any(), name
            continue
        assert got is not None, f"{name} has no gradient in the fast layer"
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}: {m}")


def check_layer(moe, x, train: bool):
    out, ref, reference, x_fast, x_ref = run_both(moe, x, train)
    torch.testing.assert_close(out.hidden, ref.hidden.float(), **TOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss.float(), **TOL)
    assert out.stats.tokens_per_expert.tolist() == ref.tokens_per_expert
    for part, stat in [
        ("balance", "balance_loss"),
        ("z", "z_loss"),
        ("importance", "importance_loss"),
        ("load", "load_loss"),
    ]:
        torch.testing.assert_close(getattr(out.stats, stat), ref.parts[part].float(), **TOL)
    assert_same_gradients(moe, out, reference, ref, x_fast, x_ref)
    return out, ref


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("capacity", list(CAPACITY), ids=list(CAPACITY))
@pytest.mark.parametrize("router", list(TOKEN_CHOICE), ids=list(TOKEN_CHOICE))
def test_token_choice_matches_reference(router, capacity, train):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        moe = make_moe(seed=3, **TOKEN_CHOICE[router], **CAPACITY[capacity], **LOSS_COEFS, **SHARED)
    x = tokens(16)
    out, ref = check_layer(moe, x, train)
    if CAPACITY[capacity]["capacity_factor"] is not None:
        # The case must exercise the overflow path, else it proves nothing about it.
        busiest = max(count for count in dropless_counts(moe, x, train))
        assert busiest > out.stats.capacity


def dropless_counts(moe, x, train):
    """Assignments per expert before capacity, from the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = dataclasses.replace(
            moe.config, capacity_factor=None, overflow="drop", batch_priority=False
        )
    unlimited = copy.deepcopy(moe).train(train)
    unlimited.config = config
    torch.manual_seed(123)
    return reference_moe(unlimited, x.double()).tokens_per_expert


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("router", list(OTHER), ids=list(OTHER))
def test_dense_expert_choice_soft_match_reference(router, train):
    moe = make_moe(seed=4, **OTHER[router], **LOSS_COEFS, **SHARED)
    # Soft MoE mixes within a sequence: use (B=2, N=5, D).
    x = tokens(10).view(2, 5, 8) if OTHER[router]["router"] == "soft" else tokens(12)
    check_layer(moe, x, train)


@pytest.mark.parametrize(
    "activation", ["swiglu", "geglu", "gelu", "relu", "silu", "swiglu_clamped"]
)
@pytest.mark.parametrize(
    "shared",
    [dict(), dict(num_shared_experts=2), SHARED],
    ids=["no_shared", "two_shared", "gated_shared"],
)
def test_activations_and_shared_experts_match_reference(activation, shared):
    moe = make_moe(seed=5, activation=activation, capacity_factor=1.0, swiglu_limit=0.8, **shared)
    check_layer(moe, tokens(12), train=False)


@pytest.mark.parametrize("router", ["noisy_topk", "switch", "top_p", "dense", "expert_choice"])
def test_router_bias_matches_reference(router):
    settings = dict(router=router, router_bias=True, expert_bias=True, **LOSS_COEFS)
    settings["top_k"] = 1 if router == "switch" else 2
    moe = make_moe(seed=8, **settings)
    assert moe.router.logit_bias.abs().sum() > 0  # randomised, so the bias counts
    check_layer(moe, tokens(12), train=router in ("noisy_topk", "switch"))


def test_biased_softmax_topk_is_gpt_oss_routing():
    """softmax over all logits, top-k, renormalised == top-k of the logits, softmax of those
    k (gpt-oss's router): exp(l_i) / sum_topk exp(l_j) either way."""
    moe = make_moe(seed=9, router_bias=True, top_k=2).eval()
    x = tokens(20)
    routing = moe.router.route(x, None)
    logits_TE = x @ moe.router.weight.t() + moe.router.logit_bias
    top_TK, ids_TK = logits_TE.topk(2, dim=-1)
    assert torch.equal(routing.ids_TK, ids_TK)
    torch.testing.assert_close(routing.weights_TK, top_TK.softmax(dim=-1), rtol=1e-6, atol=1e-6)


def test_leading_dims_match_reference():
    moe = make_moe(seed=6, top_k=2, capacity_factor=1.0, overflow="reroute")
    x = tokens(12).view(2, 3, 2, 8)
    out, _ = check_layer(moe, x, train=False)
    assert out.hidden.shape == x.shape


def test_reference_detects_a_wrong_layer():
    """The oracle can fail: a perturbed expert weight in the fast layer is caught."""
    moe = make_moe(seed=3, capacity_factor=None)
    x = tokens(8)
    reference = copy.deepcopy(moe)
    with torch.no_grad():
        moe.experts.w_down[1, 0, 0] += 1e-3
    out = moe.eval()(x)
    ref = reference_moe(reference.eval(), x.double())
    assert not torch.allclose(out.hidden, ref.hidden.float(), **TOL)


@st.composite
def layer_configs(draw):
    """Random small layer settings, including the edges (one token, one expert, top_k = E)."""
    router = draw(st.sampled_from(ROUTERS))
    # One expert-choice expert scores every token 1.0: which C tokens it takes is a tie.
    num_experts = draw(st.integers(2 if router == "expert_choice" else 1, 6))
    num_experts = max(num_experts, 2) if router == "gshard" else num_experts
    top_k = {"switch": 1, "gshard": 2}.get(router) or draw(st.integers(1, num_experts))
    settings = dict(router=router, num_experts=num_experts, top_k=top_k)
    if router == "sparsemixer":
        settings["jitter_eps"] = draw(st.sampled_from([0.01, 0.2]))
    settings["capacity_factor"] = draw(st.sampled_from([None, 0.25, 0.5, 1.0, 1.5]))
    settings["overflow"] = draw(st.sampled_from(["drop", "reroute"]))
    settings["batch_priority"] = draw(st.booleans())
    settings["renormalize"] = draw(st.booleans())
    settings["activation"] = draw(
        st.sampled_from(["swiglu", "geglu", "gelu", "relu", "silu", "swiglu_clamped"])
    )
    settings["swiglu_limit"] = draw(st.sampled_from([0.5, 7.0]))
    settings["router_bias"] = draw(st.booleans())
    settings["expert_bias"] = draw(st.booleans())
    settings["num_shared_experts"] = draw(st.integers(0, 1))
    settings["shared_expert_gate"] = draw(st.booleans())
    if router in ("sigmoid_topk", "softmax_topk"):
        divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
        settings["num_groups"] = draw(st.sampled_from(divisors))
        settings["topk_groups"] = draw(st.integers(1, settings["num_groups"]))
        settings["routed_scaling"] = draw(st.sampled_from([1.0, 2.5]))
    if router == "top_p":
        settings["top_p"] = draw(st.sampled_from([0.3, 0.6, 0.9, 1.0]))
    if router == "soft":
        settings["slots_per_expert"] = draw(st.integers(1, 2))
    num_tokens = draw(st.integers(1, 10))
    train = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return settings, num_tokens, train, seed


def check_random_layer(case):
    settings, num_tokens, train, seed = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            moe = make_moe(seed=seed, **settings, **LOSS_COEFS)
        except ValueError:
            assume(False)  # e.g. top_k larger than the experts topk_groups can reach
    x = tokens(num_tokens, seed=seed)
    if settings["router"] == "soft" and num_tokens % 2 == 0:
        x = x.view(2, num_tokens // 2, 8)
    check_layer(moe, x, train)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(layer_configs())
def test_random_layers_match_reference(case):
    check_random_layer(case)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(layer_configs())
def test_many_random_layers_match_reference(case):
    check_random_layer(case)
